"""The house rules of ../shared/ARCHITECTURE.md, checked on the source: every import points down.

Each module of fastdume/ and kernels/ belongs to a layer; a module may import its own package,
a package of a lower layer, or (for data and models, both layer 2) a same-layer package that does
not import it back. The public faces (fastdume/__init__.py, fastdume/moe.py) are imported by no
library module, and no module imports another package's private name.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (package prefix, layer); the longest matching prefix wins.
LAYERS = {
    "fastdume.cli": 7,
    "fastdume.commands": 7,
    "fastdume.attack": 6,
    "fastdume.defense": 5,
    "fastdume.eval": 5,
    "fastdume.pipeline": 4,
    "fastdume.merge": 4,
    "fastdume.router": 3,
    "fastdume.models": 2,
    "fastdume.data": 2,
    "fastdume.ops": 1,
    "fastdume.kernels": 0,
    "fastdume._C": 0,
    "fastdume._C_cuda": 0,
    "fastdume._atomic": 0,
    "fastdume._dist": 0,
}
FACES = ("fastdume", "fastdume.moe")


def module_name(path, root=ROOT):
    """Dotted name of a source file (kernels/ is installed as fastdume.kernels)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastdume", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(name):
    matches = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def sources():
    files = sorted((ROOT / "fastdume").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def imports(path, root=ROOT):
    """(imported module, imported names, line) for every import in the file, relative resolved."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, [a.name for a in node.names], node.lineno))
    return [(t, names, line) for t, names, line in found if t.split(".")[0] == "fastdume"]


def graph(files=None, root=ROOT):
    """{(source package, target package): [where]} over imports between different packages."""
    edges = {}
    for path in sources() if files is None else files:
        src = package_of(module_name(path, root))
        if src is None:  # the public faces re-export from every layer
            continue
        for target, names, line in imports(path, root):
            dst = package_of(target)
            if dst is None:  # `from fastdume import x`: the submodule decides
                dst = package_of(f"{target}.{names[0]}") if names else None
            if dst and dst != src:
                edges.setdefault((src, dst), []).append(f"{path.relative_to(root)}:{line}")
    return edges


def upward(edges):
    return [
        f"{where[0]} ({src}, layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
        for (src, dst), where in edges.items()
        if LAYERS[dst] > LAYERS[src]
    ]


def test_every_module_has_a_layer():
    missing = [str(p.relative_to(ROOT)) for p in sources() if package_of(module_name(p)) is None]
    missing = [m for m in missing if m not in ("fastdume/__init__.py", "fastdume/moe.py")]
    assert not missing, f"modules outside every layer of ARCHITECTURE.md: {missing}"


def test_imports_point_down():
    bad = upward(graph())
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_same_layer_imports_go_one_way():
    edges = graph()
    both = [
        f"{src} <-> {dst}: {edges[(src, dst)][0]} and {edges[(dst, src)][0]}"
        for src, dst in edges
        if LAYERS[src] == LAYERS[dst] and (dst, src) in edges and src < dst
    ]
    assert not both, "same-layer packages importing each other:\n" + "\n".join(both)


def test_defense_never_imports_the_attack():
    edges = graph()
    assert ("fastdume.defense", "fastdume.attack") not in edges


def test_library_modules_never_import_the_public_faces():
    bad = []
    for path in sources():
        if module_name(path) in FACES:
            continue
        for target, names, line in imports(path):
            faces = {target} if target in FACES and target != "fastdume" else set()
            if target == "fastdume":
                faces |= {f"fastdume.{n}" for n in names if f"fastdume.{n}" in FACES}
                faces |= {"fastdume"} if not names else set()
            if faces:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {sorted(faces)}")
    assert not bad, "import the owning module instead of a public face:\n" + "\n".join(bad)


def test_no_private_names_across_packages():
    bad = []
    for path in sources():
        src = package_of(module_name(path))
        for target, names, line in imports(path):
            private_module = any(p.startswith("_") for p in target.split(".")[1:])
            dst = package_of(target)
            if dst is None or dst == src or dst in ("fastdume._atomic", "fastdume._dist"):
                continue
            if private_module and not target.endswith(("._C", "._C_cuda")):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports private module {target}")
            bad += [
                f"{path.relative_to(ROOT)}:{line} imports {target}.{n}"
                for n in names
                if n.startswith("_")
            ]
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from fastdume.attack.inject import make_hooks\n", "fastdume.attack"),
        ("from ..commands import demo\n", "fastdume.commands"),
        ("def f():\n    import fastdume.cli\n", "fastdume.cli"),
    ],
)
def test_the_checker_sees_an_upward_import(tmp_path, source, expected):
    """The rule itself can fail: a defence module importing upwards (relative, or inside a
    function) is caught."""
    probe = tmp_path / "fastdume" / "defense" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    bad = upward(graph([probe], root=tmp_path))
    assert len(bad) == 1 and f"imports {expected}" in bad[0]
