"""A small, slow, pure-Python reference of prefops' list construction (``prefops.lists``).

Written from the documented rules (README "Listwise preparation"; ``prefops.lists`` docstring),
not from the Rust code: order by preference (score, else −rank), best first, ties in input
order; dedupe; drop below min_size; truncate to K ("top": the tied block at the cut is
subsampled with the prompt's seeded stream; "random": K positions drawn with it); labels
"dense_rank" (distinct preference values below, ties equal) or "score"; gains 2^ψ − 1.
The seeded stream and default prompt ids are the ones the pair reference already defines.
"""

from __future__ import annotations

from collections import Counter

from reference_prep import SplitMix64, best_first, default_prompt_id

LIST_KEYS = ["prompt_id", "prompt", "responses", "labels", "gains", "scores", "ranks", "models", "list_size"]


def preference(response: dict) -> float:
    if response.get("score") is not None:
        return float(response["score"])
    return -float(response["rank"])


def make_list(responses, prompt_id, *, list_size=None, label="dense_rank", truncate="top", min_size=2,
              dedupe=True, seed=0, dropped=None, counters=None):
    """(indices of the listed responses, best first; their labels; whether it was cut), or None."""
    dropped = dropped if dropped is not None else Counter()
    counters = counters if counters is not None else Counter()
    pref = [preference(r) for r in responses]
    order = best_first(responses, pref, dedupe, dropped)
    if len(order) < min_size:
        dropped["below_min_size"] += 1
        counters["responses_below_min_size"] += len(order)
        return None
    truncated = list_size is not None and len(order) > list_size
    if truncated:
        dropped["over_list_size"] += len(order) - list_size
        rng = SplitMix64.for_prompt(seed, prompt_id)
        if truncate == "random":
            order = [order[p] for p in rng.choose_sorted(len(order), list_size)]
        else:
            cut = pref[order[list_size - 1]]
            above = [i for i in order if pref[i] > cut]
            block = [i for i in order if pref[i] == cut]
            if len(above) + len(block) <= list_size:
                order = order[:list_size]
            else:
                order = above + [block[c] for c in rng.choose_sorted(len(block), list_size - len(above))]
    if label == "score":
        labels = [float(responses[i]["score"]) for i in order]
    else:
        values = [pref[i] for i in order]
        labels = [float(len({v for v in values if v < x})) for x in values]
    return order, labels, truncated


def lists_from_groups(groups, **options):
    """groups: dicts {prompt, responses[{content, score?, rank?, model?}], prompt_id?}.
    Returns (rows with LIST_KEYS, stats dict like prefops's)."""
    dropped = Counter()
    rows = []
    stats = Counter()
    sizes = Counter()
    for g in groups:
        pid = g.get("prompt_id") or default_prompt_id(g["prompt"])
        stats["prompts"] += 1
        stats["responses"] += len(g["responses"])
        made = make_list(g["responses"], pid, dropped=dropped, counters=stats, **options)
        if made is None:
            continue
        order, labels, truncated = made
        members = [g["responses"][i] for i in order]
        ties = sum(1 for a in range(len(labels)) for b in range(a + 1, len(labels)) if labels[a] == labels[b])
        stats["ties_kept"] += ties
        stats["lists_with_ties"] += ties > 0
        stats["lists_truncated"] += truncated
        sizes[len(order)] += 1
        rows.append({
            "prompt_id": pid,
            "prompt": g["prompt"],
            "responses": [r["content"] for r in members],
            "labels": labels,
            "gains": [2.0 ** x - 1.0 for x in labels],
            "scores": [None if r.get("score") is None else float(r["score"]) for r in members],
            "ranks": [None if r.get("rank") is None else float(r["rank"]) for r in members],
            "models": [r.get("model") for r in members],
            "list_size": len(order),
        })
    stats["lists_made"] = len(rows)
    stats["responses_below_min_size"] += 0  # present even when zero
    stats["responses_listed"] = sum(r["list_size"] for r in rows)
    return rows, {**stats, "dropped": dict(dropped), "sizes": dict(sizes)}


# --- readers for the raw formats the tests use (documented schemas) ----------------------------

def from_ultrafeedback(record, score_field="overall_score"):
    return {"prompt": record["instruction"], "prompt_id": record.get("prompt_id"),
            "responses": [{"content": c["response"], "score": c[score_field], "model": c.get("model")}
                          for c in record["completions"]]}


def from_nectar(record):
    return {"prompt": record["prompt"], "prompt_id": record.get("prompt_id"),
            "responses": [{"content": a["answer"], "rank": a["rank"], "model": a.get("model")}
                          for a in record["answers"]]}


def from_ranked_list(record):
    return {"prompt": record["prompt"], "prompt_id": record.get("prompt_id"),
            "responses": [{"content": g, "rank": r} for g, r in zip(record["generations"], record["ranking"])]}
