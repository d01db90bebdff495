"""A small, slow, pure-Python reference of the pair-table steps (curriculum, flip, augment).

Written from the documented rules (README "Data steps", the docstrings of prefops.steps), not
from the Rust code, over lists of row dicts.
"""

from __future__ import annotations

import xxhash


def counterpart(name: str):
    tokens = name.split("_")
    if "chosen" not in tokens:
        return None
    return "_".join("rejected" if t == "chosen" else t for t in tokens)


def is_margin(name: str) -> bool:
    return name == "margin" or name.endswith("_margin")


def swap(row: dict, extra=()) -> dict:
    """Chosen and rejected exchanged: every *chosen*/*rejected* column pair (plus `extra`
    pairs), margins negated."""
    out = dict(row)
    pairs = [(k, counterpart(k)) for k in row if counterpart(k) in row]
    pairs += [(a, b) for a, b in extra if a in row and b in row and (a, b) not in pairs and (b, a) not in pairs]
    for a, b in pairs:
        out[a], out[b] = row[b], row[a]
    for k in row:
        if is_margin(k) and row[k] is not None:
            out[k] = -row[k]
    return out


# ---- curriculum -------------------------------------------------------------------------------

def curriculum(rows, by="margin", descending_is_easy=True, schedule="stages"):
    def key(i):
        x = float(rows[i][by])
        return (-x if descending_is_easy else x, rows[i]["pair_id"], i)

    order = sorted(range(len(rows)), key=key)
    if schedule == "global":
        return [dict(rows[i]) for i in order]
    seen = {}
    staged = []
    for pos, i in enumerate(order):
        stage = seen.get(rows[i]["prompt_id"], 0)
        seen[rows[i]["prompt_id"]] = stage + 1
        staged.append((stage, pos, i))
    staged.sort()
    return [{**rows[i], "stage": stage} for stage, _, i in staged]


# ---- flip -------------------------------------------------------------------------------------

def keyed_unit(seed: int, domain: str, key: str) -> float:
    data = b"prefops" + seed.to_bytes(8, "little") + domain.encode() + b"\x1f" + key.encode()
    return (xxhash.xxh3_64_intdigest(data) >> 11) / float(1 << 53)


def _hallucinated(value, one_means):
    if value is None:
        return None
    v = bool(value)
    return v if one_means == "hallucinated" else not v


def flip(rows, factual=None, reward=None, rate=None, seed=0):
    """factual = (chosen_col, rejected_col, one_means); reward = (chosen_col, rejected_col, min_gap)."""
    extra = []
    if factual:
        extra.append(factual[:2])
    if reward:
        extra.append(reward[:2])
    out = []
    counts = {"factual": 0, "reward": 0, "random": 0}
    for row in rows:
        net = False
        if factual:
            c, r, one_means = factual
            if (_hallucinated(row[c], one_means), _hallucinated(row[r], one_means)) == (True, False):
                row = swap(row, extra)
                net = not net
                counts["factual"] += 1
        if reward:
            c, r, gap = reward
            xc, xr = row[c], row[r]
            if xc is not None and xr is not None and xc == xc and xr == xr and xr - xc > gap:
                row = swap(row, extra)
                net = not net
                counts["reward"] += 1
        if rate is not None and keyed_unit(seed, "flip", row["pair_id"]) < rate:
            row = swap(row, extra)
            net = not net
            counts["random"] += 1
        row = dict(row)
        row["flipped"] = bool(row.get("flipped") or False) ^ net
        out.append(row)
    return out, counts


# ---- augment ----------------------------------------------------------------------------------

def format_score(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(float(x))


def _condition(prompt, template, score):
    if isinstance(prompt, str):
        return template.format(prompt=prompt, score=score)
    messages = [dict(m) for m in prompt]
    target = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    messages[target]["content"] = template.format(prompt=messages[target]["content"], score=score)
    return messages


def augment(rows, template, score_columns=("score_chosen", "score_rejected")):
    """Every pair conditioned on its chosen's score (input order), then every pair swapped and
    conditioned on its rejected's score (input order)."""
    sc, sr = score_columns
    firsts, seconds = [], []
    for row in rows:
        a = dict(row)
        a["prompt"] = _condition(row["prompt"], template, format_score(row[sc]))
        b = swap(row, [score_columns])
        b["prompt"] = _condition(row["prompt"], template, format_score(row[sr]))
        for copy, tag, side, score, out in ((a, ":c", "chosen", row[sc], firsts),
                                            (b, ":r", "rejected", row[sr], seconds)):
            copy["pair_id"] = row["pair_id"] + tag
            copy["source_pair_id"] = row["pair_id"]
            copy["conditioned_on"] = side
            copy["target_score"] = float(score)
            out.append(copy)
    return firsts + seconds
