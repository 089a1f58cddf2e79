"""Seeded generator of worked mathematics problems (the one synthetic domain).

No real mathematics text ships with Python or Debian, so the math domain is generated: many
problem families (arithmetic stories, algebra, calculus, number theory, geometry, probability),
each with randomised names, numbers and wording, and a worked solution computed exactly here.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

NAMES = [
    "Alice", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara",
]  # fmt: skip
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("notebook", "notebooks"), ("ticket", "tickets"),
    ("marble", "marbles"), ("book", "books"), ("orange", "oranges"), ("stamp", "stamps"),
]  # fmt: skip
VARS = ["x", "y", "t", "n", "a", "u"]


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _poly(coeffs: list[int], var: str) -> str:
    """Coefficients from the highest power down, rendered as 3x^2 - 2x + 5."""
    deg = len(coeffs) - 1
    parts = []
    for i, c in enumerate(coeffs):
        p = deg - i
        if c == 0:
            continue
        mag = abs(c)
        body = "" if (mag == 1 and p > 0) else str(mag)
        if p >= 1:
            body += var + (f"^{p}" if p > 1 else "")
        sign = "-" if c < 0 else "+"
        parts.append((sign, body))
    if not parts:
        return "0"
    first_sign, first = parts[0]
    out = ("-" if first_sign == "-" else "") + first
    for sign, body in parts[1:]:
        out += f" {sign} {body}"
    return out


def shopping(r: random.Random) -> str:
    name, (one, many) = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid = r.randint(2, 15), r.randint(2, 40) * 5, 0
    total = n * price
    paid = (total // 500 + 1) * 500
    return (
        f"Problem: {name} buys {n} {many} at {price} cents per {one} and pays with "
        f"{paid} cents. How much change does {name} get?\n"
        f"Solution: The cost is {n} * {price} = {total} cents. The change is "
        f"{paid} - {total} = {paid - total} cents.\nAnswer: {paid - total}"
    )


def speed(r: random.Random) -> str:
    name = r.choice(NAMES)
    v, t = r.randint(3, 90), r.randint(2, 12)
    d = v * t
    if r.random() < 0.5:
        return (
            f"Problem: {name} travels at {v} km/h for {t} hours. How far does {name} go?\n"
            f"Solution: distance = speed * time = {v} * {t} = {d} km.\nAnswer: {d}"
        )
    return (
        f"Problem: A train covers {d} km in {t} hours. What is its average speed?\n"
        f"Solution: speed = distance / time = {d} / {t} = {v} km/h.\nAnswer: {v}"
    )


def percent(r: random.Random) -> str:
    base, p = r.randint(2, 90) * 20, r.choice([5, 10, 12, 15, 20, 25, 30, 40, 75])
    part = Fraction(base * p, 100)
    kind = r.choice(["discount", "tax", "plain"])
    if kind == "plain":
        return (
            f"Problem: What is {p}% of {base}?\nSolution: {p}% of {base} = {p}/100 * {base} "
            f"= {_frac(part)}.\nAnswer: {_frac(part)}"
        )
    sign, word = (-1, "lower") if kind == "discount" else (1, "higher")
    new = base + sign * part
    return (
        f"Problem: A price of {base} is made {p}% {word}. What is the new price?\n"
        f"Solution: The change is {p}/100 * {base} = {_frac(part)}, so the new price is "
        f"{base} {'-' if sign < 0 else '+'} {_frac(part)} = {_frac(new)}.\nAnswer: {_frac(new)}"
    )


def linear_equation(r: random.Random) -> str:
    v = r.choice(VARS)
    a, x = r.choice([i for i in range(-9, 10) if i not in (0, 1)]), r.randint(-20, 20)
    b = r.randint(-30, 30)
    c = a * x + b
    return (
        f"Problem: Solve {_poly([a, b], v)} = {c} for {v}.\n"
        f"Solution: Subtract {b} from both sides: {a}{v} = {c} - ({b}) = {c - b}. "
        f"Divide by {a}: {v} = {c - b} / {a} = {x}.\nAnswer: {v} = {x}"
    )


def quadratic(r: random.Random) -> str:
    v = r.choice(VARS)
    p, q, k = r.randint(-9, 9), r.randint(-9, 9), r.choice([1, 1, 2, 3])
    b, c = -k * (p + q), k * p * q
    disc = b * b - 4 * k * c
    roots = sorted({p, q})
    return (
        f"Problem: Find the roots of {_poly([k, b, c], v)} = 0.\n"
        f"Solution: The discriminant is b^2 - 4ac = ({b})^2 - 4*{k}*({c}) = {disc}. "
        f"Its square root is {math.isqrt(disc)}, so {v} = ({-b} +- {math.isqrt(disc)}) / "
        f"{2 * k}, which gives {' and '.join(map(str, roots))}.\n"
        f"Answer: {v} = {', '.join(map(str, roots))}"
    )


def derivative(r: random.Random) -> str:
    v = r.choice(["x", "t", "s"])
    deg = r.randint(2, 5)
    coeffs = [r.randint(-9, 9) or 1 for _ in range(deg + 1)]
    d = [c * (deg - i) for i, c in enumerate(coeffs[:-1])]
    x0 = r.randint(-3, 3)
    val = sum(c * x0 ** (len(d) - 1 - i) for i, c in enumerate(d))
    return (
        f"Problem: Differentiate f({v}) = {_poly(coeffs, v)} and evaluate f'({x0}).\n"
        f"Solution: By the power rule, d/d{v} {v}^n = n {v}^(n-1), term by term: "
        f"f'({v}) = {_poly(d, v)}. Substituting {v} = {x0} gives f'({x0}) = {val}.\n"
        f"Answer: {val}"
    )


def integral(r: random.Random) -> str:
    deg = r.randint(1, 3)
    coeffs = [r.randint(-6, 6) or 2 for _ in range(deg + 1)]
    lo, hi = sorted(r.sample(range(-3, 5), 2))
    anti = [Fraction(c, deg - i + 1) for i, c in enumerate(coeffs)]

    def big_f(x: int) -> Fraction:
        return sum(a * x ** (deg + 1 - i) for i, a in enumerate(anti))

    terms = " + ".join(f"({_frac(a)})x^{deg + 1 - i}" for i, a in enumerate(anti))
    res = big_f(hi) - big_f(lo)
    return (
        f"Problem: Compute the integral of {_poly(coeffs, 'x')} from x = {lo} to x = {hi}.\n"
        f"Solution: An antiderivative is F(x) = {terms}. Then F({hi}) - F({lo}) = "
        f"{_frac(big_f(hi))} - ({_frac(big_f(lo))}) = {_frac(res)}.\nAnswer: {_frac(res)}"
    )


def gcd_euclid(r: random.Random) -> str:
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 40), g * r.randint(2, 40)
    a, b = max(a, b), min(a, b)
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    return (
        f"Problem: Find gcd({a}, {b}) and lcm({a}, {b}).\n"
        f"Solution: Euclid's algorithm: {'; '.join(steps)}. The last non-zero remainder is "
        f"{x}, so gcd = {x}. Then lcm = {a} * {b} / {x} = {lcm}.\nAnswer: {x}, {lcm}"
    )


def fractions_sum(r: random.Random) -> str:
    f1 = Fraction(r.randint(1, 12), r.randint(2, 12))
    f2 = Fraction(r.randint(1, 12), r.randint(2, 12))
    op = r.choice(["+", "-", "*", "/"])
    res = {"+": f1 + f2, "-": f1 - f2, "*": f1 * f2, "/": f1 / f2}[op]
    how = {
        "+": "Bring both to a common denominator and add the numerators",
        "-": "Bring both to a common denominator and subtract the numerators",
        "*": "Multiply numerators and denominators",
        "/": "Multiply by the reciprocal of the second fraction",
    }[op]
    return (
        f"Problem: Simplify {_frac(f1)} {op} {_frac(f2)}.\n"
        f"Solution: {how}, then reduce by the greatest common divisor: the result is "
        f"{_frac(res)}.\nAnswer: {_frac(res)}"
    )


def pythagoras(r: random.Random) -> str:
    m, n = sorted(r.sample(range(1, 9), 2), reverse=True)
    k = r.randint(1, 4)
    a, b, c = k * (m * m - n * n), k * 2 * m * n, k * (m * m + n * n)
    return (
        f"Problem: A right triangle has legs {a} and {b}. How long is the hypotenuse?\n"
        f"Solution: By Pythagoras, c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}, "
        f"so c = {c}. The area is {a} * {b} / 2 = {_frac(Fraction(a * b, 2))}.\nAnswer: {c}"
    )


def circle(r: random.Random) -> str:
    rad = r.randint(1, 25)
    return (
        f"Problem: A circle has radius {rad}. Find its area and circumference in terms of pi.\n"
        f"Solution: Area = pi r^2 = pi * {rad}^2 = {rad * rad} pi. Circumference = 2 pi r = "
        f"{2 * rad} pi.\nAnswer: {rad * rad} pi, {2 * rad} pi"
    )


def arithmetic_series(r: random.Random) -> str:
    a, d, n = r.randint(-10, 20), r.randint(1, 9), r.randint(5, 40)
    last = a + (n - 1) * d
    s = n * (a + last) // 2
    return (
        f"Problem: Find the sum of the first {n} terms of the arithmetic sequence "
        f"{a}, {a + d}, {a + 2 * d}, ...\n"
        f"Solution: The common difference is {d}, so the {n}th term is {a} + ({n} - 1) * {d} "
        f"= {last}. The sum is n(a_1 + a_n)/2 = {n} * ({a} + {last}) / 2 = {s}.\nAnswer: {s}"
    )


def geometric_series(r: random.Random) -> str:
    a, q, n = r.randint(1, 9), r.choice([2, 3, 4, 5]), r.randint(3, 9)
    s = a * (q**n - 1) // (q - 1)
    return (
        f"Problem: Sum the geometric series {a} + {a * q} + {a * q * q} + ... with {n} terms.\n"
        f"Solution: With first term {a} and ratio {q}, S_n = a(q^n - 1)/(q - 1) = "
        f"{a}({q}^{n} - 1)/{q - 1} = {s}.\nAnswer: {s}"
    )


def probability_dice(r: random.Random) -> str:
    target = r.randint(2, 12)
    ways = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j == target)
    p = Fraction(ways, 36)
    return (
        f"Problem: Two fair dice are rolled. What is the probability that the sum is {target}?\n"
        f"Solution: There are 36 equally likely outcomes. Counting the pairs with sum "
        f"{target} gives {ways}, so the probability is {ways}/36 = {_frac(p)}.\n"
        f"Answer: {_frac(p)}"
    )


def probability_draw(r: random.Random) -> str:
    red, blue = r.randint(1, 12), r.randint(1, 12)
    total = red + blue
    p = Fraction(red * (red - 1), total * (total - 1))
    return (
        f"Problem: A bag holds {red} red and {blue} blue balls. Two are drawn without "
        f"replacement. What is the probability that both are red?\n"
        f"Solution: P = ({red}/{total}) * ({red - 1}/{total - 1}) = {_frac(p)}.\n"
        f"Answer: {_frac(p)}"
    )


def system_2x2(r: random.Random) -> str:
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    while True:
        a, b, c, d = (r.randint(-6, 6) for _ in range(4))
        det = a * d - b * c
        if det != 0 and 0 not in (a, b, c, d):
            break
    e, f = a * x + b * y, c * x + d * y
    return (
        f"Problem: Solve the system {a}x + {b}y = {e} and {c}x + {d}y = {f}.\n"
        f"Solution: The determinant is {a}*{d} - {b}*{c} = {det}. By Cramer's rule, "
        f"x = ({e}*{d} - {b}*{f}) / {det} = {x} and y = ({a}*{f} - {e}*{c}) / {det} = {y}.\n"
        f"Answer: x = {x}, y = {y}"
    )


def modular(r: random.Random) -> str:
    base, exp, mod = r.randint(2, 20), r.randint(2, 30), r.choice([7, 9, 11, 13, 17, 19, 23])
    res = pow(base, exp, mod)
    return (
        f"Problem: Compute {base}^{exp} mod {mod}.\n"
        f"Solution: Reduce the base first: {base} mod {mod} = {base % mod}. Repeated squaring "
        f"modulo {mod} gives {base}^{exp} = {res} (mod {mod}).\nAnswer: {res}"
    )


def factorize(r: random.Random) -> str:
    n = 1
    for p in r.choices([2, 3, 5, 7, 11, 13], k=r.randint(2, 6)):
        n *= p
    n, factors, m, p = max(n, 4), [], max(n, 4), 2
    while m > 1:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    divisors = math.prod(factors.count(q) + 1 for q in set(factors))
    return (
        f"Problem: Write {n} as a product of primes and count its divisors.\n"
        f"Solution: Dividing repeatedly by the smallest prime factor gives {n} = "
        f"{' * '.join(map(str, factors))}. Adding one to each prime's exponent and "
        f"multiplying gives the number of divisors, {divisors}.\nAnswer: {divisors}"
    )


def work_rate(r: random.Random) -> str:
    a, b = r.randint(2, 12), r.randint(2, 12)
    t = Fraction(a * b, a + b)
    n1, n2 = r.sample(NAMES, 2)
    return (
        f"Problem: {n1} can paint a fence in {a} hours and {n2} in {b} hours. How long "
        f"do they take together?\n"
        f"Solution: Their rates add: 1/{a} + 1/{b} = {_frac(Fraction(1, a) + Fraction(1, b))} "
        f"fence per hour, so the time is {_frac(t)} hours.\nAnswer: {_frac(t)}"
    )


def interest(r: random.Random) -> str:
    p, rate, years = r.randint(1, 50) * 100, r.choice([2, 3, 4, 5, 8, 10]), r.randint(1, 4)
    amount = Fraction(p) * Fraction(100 + rate, 100) ** years
    return (
        f"Problem: {p} dollars are invested at {rate}% interest compounded yearly. What is "
        f"the balance after {years} years?\n"
        f"Solution: A = P(1 + r)^n = {p} * (1 + {rate}/100)^{years} = "
        f"{float(amount):.2f} dollars.\nAnswer: {float(amount):.2f}"
    )


def average(r: random.Random) -> str:
    xs = [r.randint(0, 100) for _ in range(r.randint(3, 8))]
    mean = Fraction(sum(xs), len(xs))
    srt = sorted(xs)
    mid = len(xs) // 2
    median = Fraction(srt[mid]) if len(xs) % 2 else Fraction(srt[mid - 1] + srt[mid], 2)
    return (
        f"Problem: Find the mean and the median of {', '.join(map(str, xs))}.\n"
        f"Solution: The sum is {sum(xs)} over {len(xs)} values, so the mean is {_frac(mean)}. "
        f"Sorted: {', '.join(map(str, srt))}; the median is {_frac(median)}.\n"
        f"Answer: {_frac(mean)}, {_frac(median)}"
    )


def matrix_det(r: random.Random) -> str:
    m = [[r.randint(-5, 5) for _ in range(3)] for _ in range(3)]
    minors = [
        m[1][1] * m[2][2] - m[1][2] * m[2][1],
        m[1][0] * m[2][2] - m[1][2] * m[2][0],
        m[1][0] * m[2][1] - m[1][1] * m[2][0],
    ]
    det = m[0][0] * minors[0] - m[0][1] * minors[1] + m[0][2] * minors[2]
    rows = "; ".join(" ".join(map(str, row)) for row in m)
    return (
        f"Problem: Compute the determinant of the matrix [{rows}].\n"
        f"Solution: Expanding along the first row: {m[0][0]}*({minors[0]}) - "
        f"{m[0][1]}*({minors[1]}) + {m[0][2]}*({minors[2]}) = {det}.\nAnswer: {det}"
    )


def combinatorics(r: random.Random) -> str:
    n = r.randint(4, 15)
    k = r.randint(1, n - 1)
    c = math.comb(n, k)
    return (
        f"Problem: In how many ways can a committee of {k} be chosen from {n} people?\n"
        f"Solution: Order does not matter, so the count is C({n}, {k}) = {n}! / ({k}! "
        f"{n - k}!) = {c}.\nAnswer: {c}"
    )


def limit_rational(r: random.Random) -> str:
    a, b = r.randint(-6, 6), r.randint(1, 6)
    c, d = r.randint(1, 9), r.randint(-9, 9)
    return (
        f"Problem: Evaluate the limit as x -> infinity of ({c}x^2 + {a}x + {b}) / "
        f"({b}x^2 + {d}).\n"
        f"Solution: Divide numerator and denominator by x^2; every term with a power of x in "
        f"the denominator tends to 0, leaving {c}/{b} = {_frac(Fraction(c, b))}.\n"
        f"Answer: {_frac(Fraction(c, b))}"
    )


def proof_sum(r: random.Random) -> str:
    n = r.randint(3, 30)
    kind = r.choice(["odd", "natural", "squares"])
    if kind == "odd":
        return (
            f"Claim: the sum of the first n odd numbers is n^2.\nProof: For n = 1 the sum is "
            f"1 = 1^2. If 1 + 3 + ... + (2n - 1) = n^2, adding 2n + 1 gives n^2 + 2n + 1 = "
            f"(n + 1)^2, which completes the induction. For example with n = {n} the sum is "
            f"{n * n}.\nQED"
        )
    if kind == "natural":
        return (
            f"Claim: 1 + 2 + ... + n = n(n + 1)/2.\nProof: Write the sum forwards and "
            f"backwards and add the two rows term by term: each of the n columns sums to "
            f"n + 1, so twice the sum is n(n + 1). For n = {n} this gives {n * (n + 1) // 2}.\n"
            f"QED"
        )
    s = n * (n + 1) * (2 * n + 1) // 6
    return (
        f"Claim: 1^2 + 2^2 + ... + n^2 = n(n + 1)(2n + 1)/6.\nProof: By induction: the "
        f"case n = 1 holds, and adding (n + 1)^2 to n(n + 1)(2n + 1)/6 gives "
        f"(n + 1)(n + 2)(2n + 3)/6 after factoring out n + 1. For n = {n} the sum is {s}.\nQED"
    )


FAMILIES = [
    shopping, speed, percent, linear_equation, quadratic, derivative, integral, gcd_euclid,
    fractions_sum, pythagoras, circle, arithmetic_series, geometric_series, probability_dice,
    probability_draw, system_2x2, modular, factorize, work_rate, interest, average, matrix_det,
    combinatorics, limit_rational, proof_sum,
]  # fmt: skip


def generate(num_docs: int, seed: int = 0, problems_per_doc: tuple[int, int] = (3, 6)) -> list[str]:
    """`num_docs` documents, each a few worked problems drawn from all families."""
    r = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        k = r.randint(*problems_per_doc)
        docs.append("\n\n".join(r.choice(FAMILIES)(r) for _ in range(k)))
    return docs
