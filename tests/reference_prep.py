"""A small, slow, pure-Python reference of prefops' pair construction.

Written from the documented rules (README "Pair construction"), not from the Rust code, so the
property tests can compare the two on random data: same pairs, same order, same drop counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import xxhash

MASK = (1 << 64) - 1


def fingerprint(content) -> bytes:
    if isinstance(content, str):
        return content.encode()
    return b"".join(m["role"].encode() + b"\x1f" + m["content"].encode() + b"\x1e" for m in content)


def default_prompt_id(prompt) -> str:
    return f"{xxhash.xxh3_64_intdigest(fingerprint(prompt)):016x}"


def pair_id(prompt_id: str, chosen, rejected) -> str:
    data = prompt_id.encode() + b"\x00" + fingerprint(chosen) + b"\x00" + fingerprint(rejected)
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


class SplitMix64:
    def __init__(self, seed: int):
        self.state = seed & MASK

    @classmethod
    def for_prompt(cls, seed: int, prompt_id: str) -> "SplitMix64":
        data = b"prefops" + (seed & MASK).to_bytes(8, "little") + prompt_id.encode()
        return cls(xxhash.xxh3_64_intdigest(data))

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return (self.next_u64() * n) >> 64

    def choose_sorted(self, n: int, k: int) -> list[int]:
        idx = list(range(n))
        for i in range(min(k, n)):
            j = i + self.below(n - i)
            idx[i], idx[j] = idx[j], idx[i]
        return sorted(idx[: min(k, n)])


@dataclass
class RefPair:
    chosen: int
    rejected: int
    margin: float
    tie: bool


def preference(response: dict) -> float:
    if response.get("score") is not None:
        return float(response["score"])
    if response.get("rank") is not None:
        return -float(response["rank"])
    return 0.0


def best_first(responses: list[dict], pref: list[float], dedupe: bool, dropped: Counter) -> list[int]:
    """Response indices best first (Python's sort is stable: ties keep their input order), later
    copies of a text dropped and counted when ``dedupe``."""
    order = sorted(range(len(responses)), key=lambda i: -pref[i])
    if not dedupe:
        return order
    kept = []
    for i in order:
        if any(responses[k]["content"] == responses[i]["content"] for k in kept):
            dropped["duplicate_response"] += 1
        else:
            kept.append(i)
    return kept


def make_pairs(
    responses: list[dict],
    prompt_id: str,
    *,
    strategy: str = "best_vs_worst",
    min_margin: float = 0.0,
    ties: str = "drop",
    dedupe: bool = True,
    max_pairs_per_prompt: int | None = None,
    seed: int = 0,
    dropped: Counter | None = None,
) -> list[RefPair]:
    dropped = dropped if dropped is not None else Counter()
    pref = [preference(r) for r in responses]
    order = best_first(responses, pref, dedupe, dropped)
    if len(order) < 2:
        dropped["fewer_than_two_responses"] += 1
        return []
    rng = SplitMix64.for_prompt(seed, prompt_id)
    best = order[0]
    if strategy == "best_vs_worst":
        candidates = [(best, order[-1])]
    elif strategy == "best_vs_each":
        candidates = [(best, j) for j in order[1:]]
    elif strategy == "all_pairs":
        candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    elif strategy == "best_vs_random":
        if ties == "drop":
            pool = [j for j in order[1:] if pref[j] < pref[best]]
        else:
            pool = order[1:]
        candidates = [(best, pool[rng.below(len(pool))])] if pool else [(best, order[1])]
    else:
        raise ValueError(strategy)
    pairs = []
    for c, r in candidates:
        margin = pref[c] - pref[r]
        tie = margin == 0
        if tie and ties == "drop":
            dropped["tie"] += 1
            continue
        if not tie and margin < min_margin:
            dropped["below_min_margin"] += 1
            continue
        pairs.append(RefPair(c, r, margin, tie))
    if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
        dropped["over_max_pairs_per_prompt"] += len(pairs) - max_pairs_per_prompt
        pairs = [pairs[i] for i in rng.choose_sorted(len(pairs), max_pairs_per_prompt)]
    return pairs
