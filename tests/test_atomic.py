"""fastdume._atomic: folders and JSON files appear whole or not at all."""

import json
import os

import pytest
import torch

from fastdume._atomic import atomic_file, publish_directory, save_safetensors, write_json


def _fill(text):
    def fill(tmp):
        (tmp / "model.safetensors").write_text(text)

    return fill


def test_publish_directory_appears_whole_and_keeps_the_first_publisher(tmp_path):
    dest = tmp_path / "cache" / "entry"
    publish_directory(dest, _fill("first"))
    assert (dest / "model.safetensors").read_text() == "first"
    publish_directory(dest, _fill("second"))  # a concurrent builder of the same entry
    assert (dest / "model.safetensors").read_text() == "first"
    assert [p.name for p in dest.parent.iterdir()] == ["entry"], "a temporary folder was left"


def test_publish_directory_leaves_nothing_when_building_fails(tmp_path):
    dest = tmp_path / "entry"

    def broken(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_directory(dest, broken)
    assert list(tmp_path.iterdir()) == []


def test_publish_directory_refuses_to_replace_an_unrelated_folder(tmp_path):
    dest = tmp_path / "entry"
    dest.mkdir()
    (dest / "notes.txt").write_text("user data")
    with pytest.raises(OSError):
        publish_directory(dest, _fill("x"))
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_write_json_replaces_in_one_step(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_atomic_file_publishes_with_usual_permissions_or_leaves_nothing(tmp_path):
    path = save_safetensors(tmp_path / "t.safetensors", {"x": torch.arange(3.0)})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "u.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
