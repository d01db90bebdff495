"""Chainable steps over the pairs table that ``prefops.prep`` makes: curriculum order
(Curry-DPO), label flipping (F-DPO, reward disagreement, seeded random), reward-augmented
relabeling, token-level preparation, and format conversion. Each takes a pairs table (a path, any Arrow table or stream, or a previous result)
and gives a new ``pyarrow.Table`` or writes JSONL/Parquet atomically; the work runs in Rust with
the GIL released and is deterministic for a seed, whatever the batching or thread count.

>>> import prefops
>>> pairs = prefops.prep(prefops.sample_path("imagereward"), strategy="best_vs_each")
>>> staged = prefops.curriculum(pairs)            # margin = rank gap: large = easy
>>> staged.stats["pairs_per_stage"][:3]
[463, 463, 435]
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from prefops import _native
from prefops.data import PrepResult, _arrow_source

#: Reward-augmentation templates by name: ``{prompt}`` and ``{score}`` placeholders.
TEMPLATES = {
    "default": _native.AUGMENT_DEFAULT_TEMPLATE,
    "ultrafeedback": _native.AUGMENT_ULTRAFEEDBACK_TEMPLATE,
}

Source = Union[str, "os.PathLike[str]", Any]


@dataclass(frozen=True)
class StepResult:
    """What a step made. ``table`` is set when no output path was given; ``outputs`` lists
    the files written (one per stage with ``split_stages``)."""

    step: str
    stats: dict
    seconds: float
    threads: int
    outputs: Tuple[Path, ...] = ()
    table: Any = field(default=None, repr=False)

    @property
    def output(self) -> Optional[Path]:
        return self.outputs[0] if len(self.outputs) == 1 else None

    def summary(self) -> str:
        """A few lines for people."""
        s = self.stats
        where = ""
        if len(self.outputs) == 1:
            where = f" -> {self.outputs[0]}"
        elif self.outputs:
            where = f" -> {len(self.outputs)} files ({self.outputs[0].name} ...)"
        lines = [f"{self.step}{where}  ({self.seconds:.2f} s, {self.threads} threads)"]
        if self.step == "curriculum":
            lines.append(f"  rows             {s['rows']:>10,}   by {s['by']!r} "
                         f"({'larger' if s['descending_is_easy'] else 'smaller'} = easier), schedule {s['schedule']}")
            if s["difficulty_min"] is not None:
                lines.append(f"  difficulty       min {s['difficulty_min']:.4g}  mean {s['difficulty_mean']:.4g}  "
                             f"max {s['difficulty_max']:.4g}")
            if s["schedule"] == "stages":
                lines.append(f"  prompts          {s['prompts']:>10,}   stages {s['stages']}")
                shown = ", ".join(f"{i}: {n:,}" for i, n in enumerate(s["pairs_per_stage"][:12]))
                more = " ..." if s["stages"] > 12 else ""
                lines.append(f"  pairs per stage  {shown}{more}")
        elif self.step == "flip":
            lines.append(f"  rows             {s['rows']:>10,}   rules {', '.join(s['rules'])}")
            lines.append(f"  flipped          {s['flipped_total']:>10,}   factual {s['flipped_factual']:,}, "
                         f"reward {s['flipped_reward']:,}, random {s['flipped_random']:,}")
            if s["factual_labels"] is not None:
                f = s["factual_labels"]
                lines.append(f"  factual labels   (0,0) {f['both_factual']:,}  (1,0) {f['chosen_hallucinated_only']:,}  "
                             f"(0,1) {f['rejected_hallucinated_only']:,}  (1,1) {f['both_hallucinated']:,}  "
                             f"unlabelled {f['unlabelled']:,}   (1 = hallucinated)")
            if s["reward_missing"]:
                lines.append(f"  reward missing   {s['reward_missing']:>10,}   (kept)")
            if s["rate"] is not None:
                lines.append(f"  random rate      {s['rate']:>10g}   seed {s['seed']}")
        elif self.step == "augment":
            lines.append(f"  rows in          {s['rows_in']:>10,}   rows out {s['rows_out']:,}"
                         + (f", equal scores {s['equal_scores']:,}" if s["equal_scores"] else ""))
            lines.append(f"  scores from      {s['score_columns'][0]}, {s['score_columns'][1]}")
        elif self.step == "tokenize":
            lines.append(f"  rows             {s['rows']:>10,}   tokens {s['tokens']:,}   "
                         f"EOS {s['eos_token']!r} ({s['eos_from']})")
            lines.append(f"  mean length      prompt {s['mean_prompt_length']:.1f}  chosen {s['mean_chosen_length']:.1f}  "
                         f"rejected {s['mean_rejected_length']:.1f}  shared {s['mean_shared_length']:.1f}")
            lines.append(f"  truncated        prompts {s['truncated_prompts']:,}  chosen {s['truncated_chosen']:,}  "
                         f"rejected {s['truncated_rejected']:,}")
            lines.append(f"  differing        {s['differing_shared_tokens']:,} of {s['shared_tokens']:,} "
                         "aligned tokens within the shared length")
            if s["boundary_cut_prompts"]:
                # What TRL warns about once, counted: the prompt's end that is not in prompt_ids.
                first, pad = s["boundary_cut_first"], " " * 19
                lines += [
                    f"  prompt end cut   {s['boundary_cut_prompts']:>10,}   rows whose prompt alone does not encode "
                    "as a prefix of prompt + completion",
                    f"{pad}(tokens merge across the boundary, or the tokenizer ends sequences with special tokens):",
                    f"{pad}as TRL does, each completion starts where they diverge and the prompt's end is left out of",
                    f"{pad}prompt_ids: {s['boundary_cut_tokens']:,} tokens in all, first at row {first['row']:,}: "
                    f"{first['text']!r} (tokens {first['tokens']!r}).",
                    f"{pad}Training then sees a context unlike inference's; end prompts on a token boundary, or",
                    f"{pad}split 'separate' keeps them (ids then differ from TRL's).",
                ]
        elif self.step == "convert":
            lines.append(f"  rows             {s['rows']:>10,}   columns {len(s['columns'])}")
        elif self.step == "fifa":
            lines.append(f"  rows             {s['rows']:>10,}   kept {s['kept']:,}, dropped {s['dropped']:,}"
                         + (f", threshold importance {s['threshold_importance']:.4g}"
                            if s["threshold_importance"] is not None else ""))
            lines.append(f"  kNN              {s['knn']} {s['metric']}, k = {s['k']}, {s['prompts']:,} prompts "
                         f"(dim {s['embedding_dim']}), {s['prompts_in_pairs']:,} in the pairs, "
                         f"{s['duplicate_embeddings']:,} duplicate embeddings, "
                         f"{s['floored_prompts']:,} below the floor {s['distance_floor']:g}")
            for name in ("margin", "quality", "log_distance", "importance"):
                t = s[name]
                if t is not None:
                    lines.append(f"  {name:<16} min {t['min']:.4g}  mean {t['mean']:.4g}  max {t['max']:.4g}")
            lines.append(f"  weights          alpha {s['alpha']:g}, gamma {s['gamma']:g}")
        if self.step in ("flip", "augment") and s.get("swapped_columns"):
            pairs = ", ".join(f"{a}/{b}" for a, b in s["swapped_columns"])
            negated = ", ".join(s["negated_columns"]) or "none"
            lines.append(f"  swap             {pairs}; negated: {negated}")
        for m in s.get("mixed_type_columns") or ():
            kinds = " and ".join(f"{kind} (first at {where})" for kind, where in m["kinds"])
            lines.append(f"  warning          column {m['column']!r} mixes {kinds} values: read as text, "
                         "each non-string value as its JSON text")
        return "\n".join(lines)


def _step_source(source: Source) -> Any:
    """Paths and Arrow data as ``prep`` takes them, plus results of ``prep`` and of the steps."""
    if isinstance(source, (PrepResult, StepResult)):
        if source.table is not None:
            return source.table
        outputs = [source.output] if isinstance(source, PrepResult) else list(source.outputs)
        if len(outputs) != 1 or outputs[0] is None:
            raise ValueError("this result has no table and not exactly one output file to read")
        source = outputs[0]
    return _arrow_source(source)


def _threads(threads: Optional[int]) -> int:
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads or 0


def _result(table: Any, report_json: str) -> StepResult:
    report = json.loads(report_json)
    return StepResult(
        step=report["step"],
        stats=report["stats"],
        seconds=report["seconds"],
        threads=report["threads"],
        outputs=tuple(Path(p) for p in report["outputs"]),
        table=table,
    )


def _pair(value: Optional[Sequence[str]], name: str) -> Optional[Tuple[str, str]]:
    if value is None:
        return None
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be two column names (chosen side, rejected side), got {value!r}")
    return (str(value[0]), str(value[1]))


def curriculum(
    source: Source,
    output: Union[str, os.PathLike, None] = None,
    *,
    by: str = "margin",
    descending_is_easy: bool = True,
    schedule: str = "stages",
    split_stages: bool = False,
    threads: Optional[int] = None,
) -> StepResult:
    """Order pairs easy→hard (Curry-DPO).

    Args:
        source: a pairs table: .jsonl/.jsonl.gz/.json/.parquet path, any Arrow table or stream,
            or a ``PrepResult``/``StepResult``.
        output: .jsonl, .jsonl.gz or .parquet path (written atomically), or None for a table.
        by: numeric difficulty column; default ``margin`` (the score gap of the pair).
        descending_is_easy: True (default): larger values are easier, i.e. the column sorted
            descending runs easy→hard (a margin or reward gap). False: smaller values are
            easier (a loss, a difficulty score).
        schedule: ``"stages"`` (default): a 0-based ``stage`` column, stage i = the i-th easiest
            pair of every prompt (prompts with fewer pairs drop out of later stages); rows
            ordered by stage, then easy→hard. ``"global"``: all pairs easy→hard, no stage column.
            Ties are broken by ``pair_id``, then by input position.
        split_stages: with an output path, write one file per stage instead, named with
            ``.stageN`` before the extension (``pairs.stage0.parquet``, ...); either all appear or
            none does.
        threads: worker threads; default ``$PREFOPS_NUM_THREADS`` or the CPU count.
    """
    table, report = _native.curriculum(
        _step_source(source),
        None if output is None else Path(output),
        by=by,
        descending_is_easy=bool(descending_is_easy),
        schedule=schedule,
        split_stages=bool(split_stages),
        threads=_threads(threads),
    )
    return _result(table, report)


def flip_labels(
    source: Source,
    output: Union[str, os.PathLike, None] = None,
    *,
    factual: bool = False,
    hallucinated_columns: Optional[Sequence[str]] = None,
    factual_columns: Optional[Sequence[str]] = None,
    reward_columns: Optional[Sequence[str]] = None,
    reward_min_gap: float = 0.0,
    rate: Optional[float] = None,
    seed: int = 0,
    threads: Optional[int] = None,
) -> StepResult:
    """Swap chosen and rejected in selected pairs; a ``flipped`` column records which.

    Rules (any combination; applied in this order, each on the previous one's result):

    1. F-DPO factuality: ``factual=True`` finds the label columns (``chosen_hallucinated`` /
       ``rejected_hallucinated`` as ``prep`` writes them, 1 = hallucinated; else
       ``chosen_factual`` / ``rejected_factual``, 1 = factual), or name them with
       ``hallucinated_columns=(c, r)`` or ``factual_columns=(c, r)``. A pair whose chosen is
       hallucinated and whose rejected is not is swapped (its labels move with it: (1,0) →
       (0,1)); (0,0), (1,1) and unlabelled pairs are kept. Labels: bool or 0/1.
    2. Reward disagreement: ``reward_columns=(chosen_col, rejected_col)``: swap when
       ``rejected - chosen > reward_min_gap``; rows with a missing reward are kept.
    3. Random: ``rate=ε``: swap each pair with probability ε, decided from (seed, pair_id), so
       the same pairs flip whatever the batching; flipping again with the same seed restores.

    A swap exchanges every ``*chosen*``/``*rejected*`` column pair (and the rule's own
    columns) and negates ``margin`` and ``*_margin``; ``pair_id`` is kept. An existing
    ``flipped`` column is XOR-ed.
    """
    hall = _pair(hallucinated_columns, "hallucinated_columns")
    fact = _pair(factual_columns, "factual_columns")
    if hall is not None and fact is not None:
        raise ValueError("give hallucinated_columns or factual_columns, not both")
    if rate is not None and not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    table, report = _native.flip_labels(
        _step_source(source),
        None if output is None else Path(output),
        factual_columns=hall or fact,
        factual_one_means="factual" if fact is not None else "hallucinated",
        detect_factual=bool(factual) and hall is None and fact is None,
        reward_columns=_pair(reward_columns, "reward_columns"),
        reward_min_gap=float(reward_min_gap),
        rate=None if rate is None else float(rate),
        seed=int(seed),
        threads=_threads(threads),
    )
    return _result(table, report)


def reward_augment(
    source: Source,
    output: Union[str, os.PathLike, None] = None,
    *,
    template: str = "default",
    score_columns: Sequence[str] = ("score_chosen", "score_rejected"),
    threads: Optional[int] = None,
) -> StepResult:
    """Reward-augmented relabeling: each pair twice, its prompt conditioned on a target score.

    Row 1 keeps the order and names the chosen response's score; row 2 swaps chosen and
    rejected and names the rejected response's score. So every row's prompt names the score
    of its own ``chosen`` (``target_score``). All first rows come first (input order), then all
    second rows, as the source concatenates them. New columns: ``source_pair_id``,
    ``conditioned_on`` (``"chosen"``/``"rejected"``), ``target_score``; ``pair_id`` gets a
    ``:c`` / ``:r`` suffix; ``prompt_id`` is kept.

    Args:
        template: a name from ``prefops.steps.TEMPLATES`` (``"default"``:
            ``"Target score: {score}.\\n\\n{prompt}"``; ``"ultrafeedback"``: the source
            repository's system text for 1-10 scores) or a string with ``{prompt}`` and
            ``{score}`` (``{{``/``}}`` for braces). Conversational prompts: the first user
            message is rewritten. Integral scores print without a decimal point.
        score_columns: where the two scores come from (for ranked data, e.g.
            ``("rank_chosen", "rank_rejected")``).
    """
    text = TEMPLATES.get(template, template)
    table, report = _native.reward_augment(
        _step_source(source),
        None if output is None else Path(output),
        template=text,
        score_columns=_pair(score_columns, "score_columns"),
        threads=_threads(threads),
    )
    return _result(table, report)


def tokenize_pairs(
    source: Source,
    tokenizer: Union[str, os.PathLike],
    *,
    output: Union[str, os.PathLike, None] = None,
    add_special_tokens: bool = True,
    eos_token: Optional[str] = "auto",
    split: str = "joint",
    max_prompt_length: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    threads: Optional[int] = None,
) -> StepResult:
    """Token ids, completion masks, LD-DPO shared lengths and TAB-PO differing-token masks.

    ``tokenizer`` is a local ``tokenizer.json`` (Hugging Face tokenizers format; nothing is
    downloaded); ``output`` a .jsonl/.jsonl.gz/.parquet path, or None for a table. The table needs text ``prompt``/``chosen``/``rejected`` columns (conversations:
    apply the model's chat template first). Encoding, by ``split``:

    - ``"joint"`` (default; TRL 1.16's ``DPOTrainer`` text path, id for id): the EOS token's
      text is appended to each completion (unless the text already ends with it); ``prompt``,
      ``prompt + chosen`` and ``prompt + rejected`` are encoded (with the tokenizer's
      post-processor special tokens when ``add_special_tokens``) and split where the prompt's
      ids stop being a prefix of the joint ids (the shorter of the two common prefixes):
      ``prompt_ids`` is that prefix, ``chosen_ids``/``rejected_ids`` the rest of each joint
      encoding. When tokens merge across the boundary (a prompt ending in a space or mid-word,
      a completion not starting with whitespace) or the tokenizer ends every sequence with a
      special token (BERT's ``[SEP]``), the prompt's last tokens are left out of ``prompt_ids``
      and the completion starts with the merged tokens; ``stats["boundary_cut_prompts"]`` counts
      such rows and the summary says what was dropped.
    - ``"separate"``: the prompt encoded on its own (special tokens when ``add_special_tokens``:
      BOS for Llama-style tokenizers, ``[CLS] … [SEP]`` for BERT-style), each completion on its
      own without special tokens and the EOS id appended (unless it already ends with it); no
      token merges across the boundary, the prompt is never cut, but the ids differ from TRL's
      where it would merge or cut.

    Then, either way, ``prompt_ids`` is cut to its last ``max_prompt_length`` tokens and each
    completion to its first ``max_completion_length`` (a cut completion loses its EOS).

    Per pair, on the final ids (``P``, ``C``, ``R`` their lengths): ``chosen_completion_mask``
    (``P + C`` int8, aligned with ``prompt_ids + chosen_ids``: 0 on the prompt, 1 on the
    completion) and its rejected twin; ``shared_length`` = min(C, R), LD-DPO's l_p;
    ``chosen_diff_mask``/``rejected_diff_mask`` (same alignment): 1 on completion index k when
    the other completion has a different token k, else 0 (also past the other's end: TAB-PO
    compares only the first min(C, R) positions); TAB-PO's raw weights are
    ``completion_mask + (1.2 − 1)·diff_mask``. ``prompt_ids``/``chosen_ids``/``rejected_ids`` are
    what TRL's ``DataCollatorForPreference`` takes; ``prefops.losses.tokenized_pair_batch``
    pads a batch of rows into the losses' ``[2B, T]`` tensors.

    Args:
        eos_token: ``"auto"`` (default): the ``eos_token`` of the ``tokenizer_config.json``
            beside the tokenizer file, none if there is no such file; None: no EOS; else the
            token itself (it must be in the vocabulary).
        split: ``"joint"`` (default) or ``"separate"``, above.
        max_prompt_length / max_completion_length: token limits (None: no limit).

    A completion left with no tokens (e.g. empty text and no EOS) is an error naming its row.
    Columns of the same names are replaced. ``stats``: rows, tokens, truncation counts, mean
    lengths, the split and the rows whose prompt end the joint split left out.
    """
    if split not in ("joint", "separate"):
        raise ValueError(f"split must be 'joint' or 'separate', got {split!r}")
    for name, v in (("max_prompt_length", max_prompt_length), ("max_completion_length", max_completion_length)):
        if v is not None and (isinstance(v, bool) or int(v) < 1):
            raise ValueError(f"{name} must be >= 1 or None, got {v!r}")
    if eos_token == "auto":
        eos, token = "auto", None
    elif eos_token is None:
        eos, token = "off", None
    else:
        eos, token = "token", str(eos_token)
    table, report = _native.tokenize(
        _step_source(source),
        None if output is None else Path(output),
        tokenizer=Path(tokenizer),
        add_special_tokens=bool(add_special_tokens),
        eos=eos,
        eos_token=token,
        split=split,
        max_prompt_length=None if max_prompt_length is None else int(max_prompt_length),
        max_completion_length=None if max_completion_length is None else int(max_completion_length),
        threads=_threads(threads),
    )
    return _result(table, report)


def convert(
    source: Source,
    output: Union[str, os.PathLike, None] = None,
    *,
    threads: Optional[int] = None,
) -> StepResult:
    """Rewrite a table as .jsonl, .jsonl.gz or .parquet (atomically), every column kept.

    Tables that prefops writes round-trip byte for byte: JSONL → Parquet → JSONL gives the same
    bytes. JSON input is typed over the whole file: a column of integers stays Int64, integers
    mixed with floats become Float64, objects become structs whose missing keys are null, and
    a column whose values mix incompatible JSON types (text and numbers, say) is kept as text
    (each non-string value as its JSON). ``stats["columns"]`` lists the Arrow type chosen for
    each column, and ``stats["mixed_type_columns"]`` (as every step's stats) the columns read as
    text that way, each with the JSON kinds found and where each first appears.
    """
    table, report = _native.convert(
        _step_source(source),
        None if output is None else Path(output),
        threads=_threads(threads),
    )
    return _result(table, report)


class _CurriculumSamplerBase:
    """Batches of row indices in curriculum order: stage by stage, shuffled within a stage.

    ``data`` is the output of ``prefops.curriculum`` (a table with a ``stage`` column), or the
    stage of each row as a sequence of ints; a table without a ``stage`` column (the global
    schedule) is one stage, best used with ``shuffle=False`` to keep its easy→hard order.
    A batch never mixes stages. ``set_stage(i)`` restricts iteration to one stage (Curry-DPO
    trains the stages one after another, the policy of stage i becoming the reference of
    stage i + 1); ``set_epoch(e)`` reshuffles (seeded by seed, epoch and stage).
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        stage: Optional[int] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stages = _stage_list(data)
        self._by_stage: dict = {}
        for i, s in enumerate(stages):
            self._by_stage.setdefault(int(s), []).append(i)
        self.stages: List[int] = sorted(self._by_stage)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.stage: Optional[int] = None
        self.set_stage(stage)

    @property
    def stage_sizes(self) -> dict:
        """Rows per stage."""
        return {s: len(self._by_stage[s]) for s in self.stages}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_stage(self, stage: Optional[int]) -> None:
        if stage is not None and stage not in self._by_stage:
            raise ValueError(f"no stage {stage}; stages are {self.stages}")
        self.stage = stage

    def _active(self) -> List[int]:
        return self.stages if self.stage is None else [self.stage]

    def _batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches(len(self._by_stage[s])) for s in self._active())

    def __iter__(self) -> Iterator[List[int]]:
        for s in self._active():
            rows = list(self._by_stage[s])
            if self.shuffle:
                random.Random(f"prefops-curriculum:{self.seed}:{self.epoch}:{s}").shuffle(rows)
            for b in range(self._batches(len(rows))):
                yield rows[b * self.batch_size:(b + 1) * self.batch_size]


def _stage_list(data: Any) -> List[int]:
    if isinstance(data, StepResult):
        data = data.table
    names = getattr(data, "column_names", None)
    if names is None and hasattr(data, "columns") and not isinstance(data, (list, tuple)):
        names = list(data.columns)  # polars / pandas
    if names is not None:
        if "stage" in names:
            col = data["stage"]
            values = col.to_pylist() if hasattr(col, "to_pylist") else list(col)
        else:
            values = [0] * (data.num_rows if hasattr(data, "num_rows") else len(data))
    else:
        values = data.to_pylist() if hasattr(data, "to_pylist") else list(data)
    if any(v is None for v in values):
        raise ValueError("stage values must not be null")
    return [int(v) for v in values]


_SAMPLER_CLASS = None


def _sampler_class() -> type:
    """The sampler class: a ``torch.utils.data.Sampler`` subclass when torch is importable
    (imported only now, on first use), else the plain Python class."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is None:
        try:
            from torch.utils.data import Sampler
        except ImportError:
            bases: tuple = (_CurriculumSamplerBase,)
        else:
            bases = (_CurriculumSamplerBase, Sampler)
        _SAMPLER_CLASS = type("CurriculumSampler", bases, {
            "__doc__": _CurriculumSamplerBase.__doc__,
            "__module__": __name__,
            "__qualname__": "CurriculumSampler",
        })
    return _SAMPLER_CLASS


def __getattr__(name: str) -> Any:
    if name == "CurriculumSampler":
        return _sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
