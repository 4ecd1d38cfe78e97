"""
The `mutate` proposer's edit of train.py, as pure functions: find the active profile's hyperparameter
lines (`NAME = literal`, top level or in the profile's `if PROFILE == ...` block), change one of them by
a seeded random step within bounds that keep every proposal trainable, and never propose a train.py that
was measured before.
"""
import ast
import operator
import re

from autoresearch.gitrepo import blob_hash
from autoresearch.layout import TRAIN, LoopError

# -----------------------------------------------------------------------------
# What may change, and by how much

# name: (kind, low, high). int: +/- ~12%; pow2: x2 or /2; scale: x or / 1.25..2; ratio: +/- 0.05..0.1;
# betas: 1 - beta scaled by 1.5 or 2. Bounds keep every proposal trainable.
MUTATIONS = {
    "DEPTH": ("int", 1, 48), "ASPECT_RATIO": ("int", 8, 256), "HEAD_DIM": ("pow2", 16, 256),
    "TOTAL_BATCH_SIZE": ("pow2", 2**10, 2**24), "DEVICE_BATCH_SIZE": ("pow2", 1, 1024),
    "EMBEDDING_LR": ("scale", 1e-4, 10.0), "UNEMBEDDING_LR": ("scale", 1e-5, 1.0),
    "MATRIX_LR": ("scale", 1e-4, 1.0), "SCALAR_LR": ("scale", 1e-4, 10.0), "WEIGHT_DECAY": ("scale", 1e-4, 2.0),
    "ADAM_BETAS": ("betas", 0.5, 0.999), "WARMUP_RATIO": ("ratio", 0.0, 0.5),
    "WARMDOWN_RATIO": ("ratio", 0.0, 1.0), "FINAL_LR_FRAC": ("ratio", 0.0, 1.0),
}
SCALE_FACTORS = (1.25, 1.25, 1.5, 2.0)       # small steps most often
ASSIGN = re.compile(r"^(?P<indent>[ \t]*)(?P<name>[A-Z][A-Z0-9_]*)[ \t]*=[ \t]*(?P<value>[^#\n]*?)[ \t]*(#.*)?$")
PROFILE_IF = re.compile(r"^(?P<kw>if|elif)\s+PROFILE\s*(==|in)\s*(?P<names>.+?)\s*:\s*(#.*)?$")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


# -----------------------------------------------------------------------------
# Reading train.py's hyperparameters


def literal(text):
    """Value of a plain hyperparameter literal (numbers, 2**18, 4 * 64, tuples), else None."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        raise ValueError(text)
    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ArithmeticError):
        return None


def active_hyperparameters(source, profile):
    """NAME -> (line index, regex match, value) for the active profile: the line in the profile's
    `if PROFILE == ...` block when there is one, else the top-level line (train.py's contract)."""
    top, block = {}, {}
    in_block = matched = False
    for i, line in enumerate(source.split("\n")):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            m = PROFILE_IF.match(line)
            if m:
                names = set(re.findall(r"[\"'](\w+)[\"']", m["names"]))
                matched = False if m["kw"] == "if" else matched
                in_block = profile in names and not matched
                matched |= in_block
                continue
            if re.match(r"else\s*:", line):
                in_block, matched = not matched, True
                continue
            in_block = False
        elif not in_block:
            continue
        m = ASSIGN.match(line)
        if m and literal(m["value"]) is not None:
            (block if in_block else top)[m["name"]] = (i, m, literal(m["value"]))
    return {**top, **block}


# -----------------------------------------------------------------------------
# One seeded change


def mutate_value(name, value, rng):
    kind, low, high = MUTATIONS[name]
    up = rng.random() < 0.5
    if kind == "int":
        step = max(1, round(abs(value) / 8))
        new = value + step if up else value - step
    elif kind == "pow2":
        new = value * 2 if up else (value // 2 if value % 2 == 0 else None)
    elif kind == "scale":
        factor = rng.choice(SCALE_FACTORS)
        new = float(f"{value * factor if up else value / factor:.3g}") if value > 0 else None
    elif kind == "ratio":
        step = rng.choice((0.05, 0.1))
        new = round(value + step if up else value - step, 4)
    else:  # betas: move 1 - beta, the scale on which betas matter
        i, factor = rng.randrange(len(value)), rng.choice((1.5, 2.0))
        gap = (1 - value[i]) * factor if up else (1 - value[i]) / factor
        new = tuple(round(1 - gap, 3) if j == i else v for j, v in enumerate(value))
    parts = new if isinstance(new, tuple) else (new,)
    return new if new is not None and all(low <= p <= high for p in parts) else None


def consistent(params, max_seq_len):
    """Rules train.py relies on: the device batch divides the total batch (in tokens), and
    warmup + warmdown fit in the budget."""
    total, device = params.get("TOTAL_BATCH_SIZE"), params.get("DEVICE_BATCH_SIZE")
    if total and device and max_seq_len and (total % (device * max_seq_len) or total < device * max_seq_len):
        return False
    return params.get("WARMUP_RATIO", 0) + params.get("WARMDOWN_RATIO", 0) <= 1


def format_value(value, old_text):
    if isinstance(value, tuple):
        return "(" + ", ".join(format_value(v, "") for v in value) + ")"
    if isinstance(value, int) and "**" in old_text and value > 0 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return repr(value)  # a float's repr always reads back as a float


def propose_mutation(source, profile, max_seq_len, rng, seen):
    """(new source, description): one seeded change of one hyperparameter, never a train.py that
    was measured before; None when no new mutation is found."""
    params = active_hyperparameters(source, profile)
    names = sorted(name for name in MUTATIONS if name in params)
    if not names:
        raise LoopError(f"mutate: {TRAIN} has none of the hyperparameters it knows ({', '.join(MUTATIONS)}) "
                        f"as plain `NAME = number` lines")
    values = {name: v for name, (_, _, v) in params.items()}
    for _ in range(300):
        name = rng.choice(names)
        i, m, value = params[name]
        new = mutate_value(name, value, rng)
        if new is None or new == value or not consistent({**values, name: new}, max_seq_len):
            continue
        text = format_value(new, m["value"])
        lines = source.split("\n")
        lines[i] = lines[i][:m.start("value")] + text + lines[i][m.end("value"):]
        candidate = "\n".join(lines)
        if blob_hash(candidate.encode()) not in seen:
            return candidate, f"{name} {m['value'].strip()} -> {text}"
    return None
