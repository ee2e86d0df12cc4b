"""`search`: the per-knob sparsity config that keeps the most accuracy within a latency budget.

SparseViT's resource-constrained evolutionary search (population 100, parents the top 25,
mutation probability 0.1 per knob, half the children by mutation and half by crossover,
infeasible candidates rejected so every population is feasible), with two changes that make it
usable on a device fleet: latency comes from a table measured on the target (latency.py), and
the final candidates are compiled and measured for real, the answer being the most accurate one
whose *measured* latency fits. Accuracy = the adapted model's top-1 on (a fixed subset of) the
validation split under the config, cached by the windows each knob keeps: configs keeping the
same windows are the same network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import ConfigError, EdgeVitError, InfeasibleBudget
from edgevit.fileio import read_artifact, read_cache, write_json
from edgevit.latency import LatencyTable
from edgevit.sparsity import SparsityConfig, keep_counts, knob_windows, stage_keep_keys
from edgevit.stages import StageRun

RESULT_KIND = "edgevit.search_result"
STALL_GENERATIONS = 5   # generations without a new config: the reachable space is exhausted
Log = Callable[[str], None]

__all__ = ["InfeasibleBudget", "SearchConfig", "SearchResult", "parse_budget", "run_search", "search"]


def parse_budget(text: str | float) -> float:
    """'20ms', '500us', '0.02s', '20' or 20 (ms) -> milliseconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise ConfigError(f"--budget must be a positive latency, got {text!r}")
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|us|µs|s)?\s*", str(text))
    if not m:
        raise ConfigError(f"--budget {text!r} is not a latency; write e.g. 20ms or 500us")
    value, unit = float(m.group(1)), (m.group(2) or "ms")
    ms = value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit]
    if not math.isfinite(ms):
        raise ConfigError(f"--budget {str(text)[:40]!r} is too large to be a latency; write e.g. 20ms or 500us")
    if ms <= 0:
        raise ConfigError(f"--budget must be positive, got {text!r}")
    return ms


@dataclass(frozen=True)
class SearchConfig:
    """The search's settings; also the recipe's [search] table."""

    budget: str | float = "1ms"     # '20ms', '500us', '0.02s'; a number is ms
    population: int = 100
    parents: int | None = None      # the best this many breed; default a quarter of the population (>= 2)
    mutation_prob: float = 0.1
    evaluations: int = 500          # distinct accuracy evaluations (the cost that matters)
    max_generations: int = 50
    val_images: int = 2000          # fixed validation subset used to score candidates
    measure_top: int = 5            # final candidates compiled and measured for real
    seed: int = 0
    finetune: int = 0               # epochs of fine-tuning for the chosen config
    tuning: bool = True             # use the target's tuning database when it has records

    def __post_init__(self):
        try:
            parse_budget(self.budget)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("--")) from None
        if self.population < 4 or self.evaluations < 1 or self.val_images < 0:
            raise ValueError("population must be >= 4, evaluations >= 1 and val_images >= 0")
        if not 2 <= self.n_parents <= self.population:
            raise ValueError("parents must be between 2 and the population size")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError("mutation probability must be in [0, 1]")
        if self.measure_top < 1 or self.max_generations < 1 or self.finetune < 0:
            raise ValueError("measure_top and max_generations must be >= 1, finetune >= 0")

    @functools.cached_property
    def budget_ms(self) -> float:
        return parse_budget(self.budget)

    @property
    def n_parents(self) -> int:
        return self.parents if self.parents is not None else max(2, self.population // 4)


@dataclass
class Candidate:
    ratios: tuple[float, ...]
    keep: tuple[int, ...]
    predicted_ms: float
    val_top1: float


# ---------------------------------------------------------------------------- scoring


class AccuracyOracle:
    """Top-1 of the adapted model on a fixed validation subset, cached by windows kept.

    Stage outputs are reused across configs: a stage's output depends only on the windows its
    blocks and the earlier stages' blocks keep, and the first knobs take few values (the fashion
    model's first knob reaches 9 window counts), so after a few evaluations most configs start
    from a stored stage output. The last prunable stage's output is never stored (a config that
    matches a stored one up to there is a network already scored), nor is anything past
    `reuse_bytes` in all."""

    def __init__(self, ckpt: Checkpoint, val_images: int, seed: int, reuse_bytes: int = 1 << 30):
        from edgevit.data import ImageSet, batches, load_data

        self.model = ckpt.build_model().eval()
        d = ckpt.data
        if not d.get("spec"):
            raise ConfigError("the checkpoint records no data set, and search scores configs on its validation "
                              "split; adapt it on your data first (`edgevit adapt --checkpoint CKPT --data SPEC`)")
        data = load_data(d["spec"], self.model.cfg.img_size, d.get("seed", 0), d.get("val_fraction", 0.1))
        self.data, self.mean, self.std = data, d.get("mean", data.mean), d.get("std", data.std)
        val = data.val
        if val_images and len(val) > val_images:
            idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:val_images]
            val = ImageSet(val.images[idx], val.labels[idx], val.classes, val.hflip)
        # 256 images a batch: measured 1.3 s per 2000-image evaluation against 1.6 s with 500
        # (the activations of a larger batch fall out of cache)
        self.batches = list(batches(val, self.mean, self.std, 256))
        self.cache: dict[str, float] = {}
        self.reuse = StageOutputs(reuse_bytes)
        prunable = [i for i, stage in enumerate(self.model.layers) if stage.blocks[0].num_windows > 1]
        self.reusable_stages = prunable[-1] if prunable else 0   # stages 0 .. this - 1 are stored

    def __call__(self, config: SparsityConfig, keep: tuple[int, ...]) -> float:
        key = ",".join(map(str, keep))
        if key not in self.cache:
            self.model.set_sparsity(config)
            with torch.inference_mode():
                correct = sum((self._logits(i, x).argmax(1) == y).sum().item() for i, (x, y) in enumerate(self.batches))
            self.cache[key] = 100.0 * correct / max(sum(len(y) for _, y in self.batches), 1)
        return self.cache[key]

    def _logits(self, batch: int, images: torch.Tensor) -> torch.Tensor:
        """The model's forward on one validation batch, from the deepest stored stage output."""
        m = self.model
        keys = stage_keep_keys(m)
        start, x = 0, None
        for stage in reversed(range(self.reusable_stages)):
            x = self.reuse.get(keys[stage], batch)
            if x is not None:
                start = stage + 1
                break
        if x is None:
            x = m.patch_embed.norm(m.patch_embed.proj(images).permute(0, 2, 3, 1))   # (B, H, W, C)
        for stage in range(start, len(m.layers)):
            x = m.layers[stage](x)                                                     # (B, H', W', C')
            if stage < self.reusable_stages:
                self.reuse.put(keys[stage], batch, x, len(self.batches))
        return m.head.fc(m.norm(x).mean(dim=(1, 2)))                                   # (B, classes)

    def test_top1(self, config: SparsityConfig) -> float:
        from edgevit.train import evaluate

        self.model.set_sparsity(config)
        return evaluate(self.model, self.data.test, self.mean, self.std)["top1"]


class StageOutputs:
    """Stored stage outputs of every validation batch, by stage key, up to `max_bytes` in all
    (first come, first kept: the early keys are the ones every later config shares)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.outputs: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
        self.refused: set[tuple[int, ...]] = set()
        self.hits = 0

    def get(self, key: tuple[int, ...], batch: int) -> torch.Tensor | None:
        x = self.outputs.get(key, {}).get(batch)
        self.hits += x is not None
        return x

    def put(self, key: tuple[int, ...], batch: int, x: torch.Tensor, batches: int) -> None:
        """Store one batch's output; a key is admitted whole (room for all `batches`) or not at all."""
        if key in self.refused or batch in self.outputs.get(key, {}):
            return
        if key not in self.outputs:
            need = x.element_size() * x.numel() * batches
            if self.bytes + need > self.max_bytes:
                self.refused.add(key)
                return
            self.outputs[key], self.bytes = {}, self.bytes + need
        self.outputs[key][batch] = x.contiguous()


# ---------------------------------------------------------------------------- evolution


class Evolution:
    """Rejection-sampled evolutionary search over one model's knob ratios."""

    def __init__(self, base: SparsityConfig, model, table: LatencyTable, oracle: AccuracyOracle,
                 cfg: SearchConfig):
        self.base, self.model, self.table, self.oracle, self.cfg = base, model, table, oracle, cfg
        self.rng = random.Random(cfg.seed)
        self.sampled = self.feasible = 0

    def make(self, ratios: list[float], fresh_only: bool = False) -> Candidate | None:
        """A candidate if feasible (ratios sorted per stage), else None (rejected); with
        `fresh_only`, also None for a network already evaluated (as SPOS/OFA searches skip
        visited candidates, so every generation brings new configs)."""
        config = self._config(ratios)
        keep = keep_counts(self.model, config)
        if fresh_only and ",".join(map(str, keep)) in self.oracle.cache:
            return None
        predicted = self.table.predict(keep)
        self.sampled += 1
        if predicted > self.cfg.budget_ms:
            return None
        self.feasible += 1
        return Candidate(config.ratios, keep, predicted, self.oracle(config, keep))

    def _config(self, ratios: list[float]) -> SparsityConfig:
        out, i = [], 0
        for n in self.base.stage_knobs:
            out.extend(sorted(ratios[i:i + n]))
            i += n
        return SparsityConfig(tuple(out), self.base.stage_knobs, self.base.levels)

    def random_ratios(self) -> list[float]:
        return [self.rng.choice(self.base.levels) for _ in self.base.ratios]

    def mutate(self, parent: Candidate) -> list[float]:
        return [self.rng.choice(self.base.levels) if self.rng.random() < self.cfg.mutation_prob else r
                for r in parent.ratios]

    def crossover(self, a: Candidate, b: Candidate) -> list[float]:
        return [self.rng.choice((x, y)) for x, y in zip(a.ratios, b.ratios)]

    def fill(self, produce: Callable[[], list[float]], count: int, tries: int) -> list[Candidate]:
        out = []
        for _ in range(tries):
            if len(out) >= count or len(self.oracle.cache) >= self.cfg.evaluations:
                break
            cand = self.make(produce(), fresh_only=True)
            if cand is not None:
                out.append(cand)
        return out

    def first_population(self) -> list[Candidate]:
        return self.fill(self.random_ratios, self.cfg.population, self.cfg.population * 200)

    def next_population(self, population: list[Candidate]) -> list[Candidate]:
        parents = sorted(population, key=lambda c: -c.val_top1)[: self.cfg.n_parents]
        n_mut = self.cfg.population // 2
        n_cross = self.cfg.population - len(parents) - n_mut
        mutated = self.fill(lambda: self.mutate(self.rng.choice(parents)), n_mut, n_mut * 50)
        crossed = self.fill(lambda: self.crossover(*self.rng.sample(parents, 2)), n_cross, n_cross * 50)
        # When the parents' neighbourhood is used up (small spaces, tight budgets), random
        # feasible newcomers fill the rest, so evolution never stops short of what random
        # sampling would still find; the search ends only when those run out too.
        missing = self.cfg.population - len(parents) - len(mutated) - len(crossed)
        newcomers = self.fill(self.random_ratios, missing, missing * 200) if missing > 0 else []
        return parents + mutated + crossed + newcomers

    def state(self) -> dict:
        return {"rng": _rng_to_json(self.rng.getstate()), "sampled": self.sampled, "feasible": self.feasible}

    def restore(self, state: dict) -> None:
        self.rng.setstate(_rng_from_json(state["rng"]))
        self.sampled, self.feasible = state["sampled"], state["feasible"]


def _rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state):
    return (state[0], tuple(state[1]), state[2])


# ---------------------------------------------------------------------------- the verb


@dataclass(frozen=True)
class SearchResult:
    sparsity: dict
    budget_ms: float
    target: str
    val_top1: float
    test_top1: float
    predicted_ms: float
    measured_ms: float
    pareto: list[dict]
    evaluations: int
    generations: int
    seconds: float
    candidates_measured: list[dict] = field(default_factory=list)
    finetuned_test_top1: float | None = None
    table: dict = field(default_factory=dict)
    seed: int = 0
    uniform: list[dict] = field(default_factory=list)   # uniform-ratio baseline: ratio, predicted_ms, val_top1
    inputs: dict = field(default_factory=dict)          # checkpoint digest, table and settings it was made from

    def to_dict(self) -> dict:
        return {"kind": RESULT_KIND, "version": 1, **asdict(self)}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SearchResult":
        d = read_artifact(path, RESULT_KIND, "write one with `edgevit search`")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise EdgeVitError(f"{path}: damaged search result ({e}); search again") from None

    @property
    def config(self) -> SparsityConfig:
        return SparsityConfig.from_dict(self.sparsity, "search result sparsity")


def fastest_reachable(table: LatencyTable) -> float:
    return table.predict(tuple(min(table.deltas[i], key=table.deltas[i].get) if table.deltas[i] else n
                               for i, n in enumerate(table.windows)))


def check_feasible(table: LatencyTable, budget_ms: float, model_name: str, model=None) -> None:
    if model is not None and table.windows != knob_windows(model):
        raise ConfigError(f"the latency table's knobs (windows {table.windows}) are not {model_name}'s "
                          f"({knob_windows(model)}); profile this model (`edgevit profile`)")
    fastest = fastest_reachable(table)
    if fastest > budget_ms:
        raise InfeasibleBudget(
            f"no sparsity config of {model_name} fits {budget_ms:g} ms on {table.key['target']}: the fastest "
            f"reachable is {fastest:.2f} ms (dense {table.dense_ms:.2f} ms); fit it with a smaller model, a lower "
            f"input resolution, a larger budget (>= {fastest * 1.05:.2f} ms) or a faster target (`edgevit targets`)")


def search(ckpt: Checkpoint, table: LatencyTable, cfg: SearchConfig, measure: Callable[[SparsityConfig], float],
           state_path: Path | None = None, log: Log = print) -> SearchResult:
    """Evolution under the predictor, then real measurement of the best `measure_top` candidates."""
    from tqdm import tqdm

    start = time.perf_counter()
    model = ckpt.build_model().eval()
    check_feasible(table, cfg.budget_ms, ckpt.model_name, model)
    oracle = AccuracyOracle(ckpt, cfg.val_images, cfg.seed)
    evo = Evolution(SparsityConfig.for_model(model), model, table, oracle, cfg)
    seen: dict[str, Candidate] = {}
    generation, population, stalled = 0, [], 0
    resumed = _load_state(state_path, cfg, table)
    if resumed:
        oracle.cache.update(resumed["cache"])
        evo.restore(resumed["evolution"])
        population = [Candidate(tuple(c["ratios"]), tuple(c["keep"]), c["predicted_ms"], c["val_top1"])
                      for c in resumed["population"]]
        seen = {_key(c): c for c in (Candidate(tuple(c["ratios"]), tuple(c["keep"]), c["predicted_ms"], c["val_top1"])
                                     for c in resumed["seen"])}
        generation, stalled = resumed["generation"], resumed.get("stalled", 0)
        log(f"resuming search at generation {generation} ({len(oracle.cache)} accuracy evaluations cached)")
    bar = tqdm(total=cfg.evaluations, initial=len(oracle.cache), unit="eval", desc="search", leave=False,
               disable=None)
    while generation < cfg.max_generations and len(oracle.cache) < cfg.evaluations and stalled < STALL_GENERATIONS:
        before = len(oracle.cache)
        population = evo.first_population() if not population else evo.next_population(population)
        if not population:
            break
        generation += 1
        stalled = stalled + 1 if len(oracle.cache) == before else 0
        for c in population:
            seen.setdefault(_key(c), c)
        best = max(population, key=lambda c: c.val_top1)
        bar.n = len(oracle.cache)
        bar.set_postfix(gen=generation, best=f"{best.val_top1:.2f}%",
                        feasible=f"{evo.feasible / max(evo.sampled, 1):.0%}")
        bar.refresh()
        _save_state(state_path, cfg, table, generation, stalled, population, seen, oracle, evo)
    bar.close()
    if not seen:
        raise InfeasibleBudget(f"no feasible config found within {cfg.budget_ms:g} ms after {evo.sampled} samples")
    return _finish(ckpt, table, cfg, measure, oracle, list(seen.values()), generation, start, log)


def _finish(ckpt, table, cfg, measure, oracle, seen, generations, start, log) -> SearchResult:
    ranked = sorted(seen, key=lambda c: (-c.val_top1, c.predicted_ms))
    measured, chosen = [], None
    for cand in ranked[: cfg.measure_top]:
        base = SparsityConfig.for_model(oracle.model)
        config = SparsityConfig(cand.ratios, base.stage_knobs, base.levels)
        ms = measure(config)
        measured.append({"ratios": list(cand.ratios), "val_top1": cand.val_top1, "predicted_ms": cand.predicted_ms,
                         "measured_ms": ms, "fits": ms <= cfg.budget_ms})
        log(f"candidate {list(cand.ratios)}: val {cand.val_top1:.2f}%, predicted {cand.predicted_ms:.3f} ms, "
            f"measured {ms:.3f} ms{'' if ms <= cfg.budget_ms else ' (over budget)'}")
        if ms <= cfg.budget_ms:
            chosen = (cand, config, ms)
            break
    if chosen is None:
        raise InfeasibleBudget(f"none of the {len(measured)} best candidates measured within {cfg.budget_ms:g} ms "
                               f"(closest {min(m['measured_ms'] for m in measured):.3f} ms); the latency table is off "
                               "for this device: profile again (`edgevit profile`) or raise the budget")
    cand, config, ms = chosen
    evaluations = len(oracle.cache)   # before the uniform baseline is scored (it is not part of the search)
    return SearchResult(config.to_dict(), cfg.budget_ms, table.key["target"], cand.val_top1, oracle.test_top1(config),
                        cand.predicted_ms, ms, pareto_front(seen), evaluations, generations,
                        time.perf_counter() - start, measured, table=table.key, seed=cfg.seed,
                        uniform=uniform_curve(table, oracle))


def uniform_curve(table: LatencyTable, oracle: AccuracyOracle) -> list[dict]:
    """The baseline a search must beat: every uniform ratio, its predicted latency and val top-1
    (same validation subset as the search), for the report's accuracy-latency plot."""
    base = SparsityConfig.for_model(oracle.model)
    points = []
    for r in base.levels:
        config = SparsityConfig.uniform(oracle.model, r, base.levels)
        keep = keep_counts(oracle.model, config)
        points.append({"ratio": r, "predicted_ms": table.predict(keep), "val_top1": oracle(config, keep)})
    return points


def pareto_front(cands: list[Candidate]) -> list[dict]:
    """Configs no other config beats on both predicted latency and accuracy, fastest first."""
    front, best = [], -1.0
    for c in sorted(cands, key=lambda c: (c.predicted_ms, -c.val_top1)):
        if c.val_top1 > best:
            front.append({"ratios": list(c.ratios), "predicted_ms": c.predicted_ms, "val_top1": c.val_top1})
            best = c.val_top1
    return front


def random_search(ckpt: Checkpoint, table: LatencyTable, cfg: SearchConfig, oracle: AccuracyOracle | None = None
                  ) -> Candidate:
    """The baseline: feasible random configs until `cfg.evaluations` distinct evaluations, the best."""
    model = ckpt.build_model().eval()
    oracle = oracle or AccuracyOracle(ckpt, cfg.val_images, cfg.seed)
    oracle.cache.clear()
    evo = Evolution(SparsityConfig.for_model(model), model, table, oracle, cfg)
    best = None
    for _ in range(cfg.evaluations * 200):
        if len(oracle.cache) >= cfg.evaluations:
            break
        cand = evo.make(evo.random_ratios())
        if cand is not None and (best is None or cand.val_top1 > best.val_top1):
            best = cand
    return best


def _key(c: Candidate) -> str:
    return ",".join(map(str, c.keep))


def _settings_digest(cfg: SearchConfig, table: LatencyTable) -> str:
    return hashlib.sha256(json.dumps([asdict(cfg), table.to_dict()], sort_keys=True).encode()).hexdigest()[:16]


def _save_state(path, cfg, table, generation, stalled, population, seen, oracle, evo) -> None:
    if path is None:
        return
    write_json(path, {"settings": _settings_digest(cfg, table), "generation": generation, "stalled": stalled,
                      "population": [asdict(c) for c in population], "seen": [asdict(c) for c in seen.values()],
                      "cache": oracle.cache, "evolution": evo.state()})


def _load_state(path, cfg, table) -> dict | None:
    state = read_cache(path)   # only a cache: a missing or damaged one starts over
    return state if state and state.get("settings") == _settings_digest(cfg, table) else None


def run_search(ckpt: Checkpoint, target, cfg: SearchConfig, out_path: str | Path, table_path: str | Path | None = None,
               device=None, log: Log = print) -> SearchResult:
    """The whole command: latency table (profiled if missing), evolution, real measurement, the
    result written atomically; a `<out>.state.json` beside it makes a killed run resume."""
    from edgevit.latency import Measurer, ProfileConfig, ensure_table

    out_path = Path(out_path)
    if out_path.is_dir():
        raise EdgeVitError(f"{out_path} is a folder; pass the path of the result file to write (-o result.json)")
    if cfg.finetune and ckpt.quantization is not None:
        raise ConfigError(f"search --finetune trains the model, which a {ckpt.scheme} checkpoint cannot be: search "
                          "the fp32 checkpoint with --finetune and quantize the fine-tuned one, or drop --finetune")
    table, _ = ensure_table(ckpt, target, device, ProfileConfig(tuning=cfg.tuning), table_path, log=log)
    measurer = Measurer(ckpt, target, device, ProfileConfig(tuning=table.key["schedules"] != "rules"))
    state = out_path.with_name(out_path.name + ".state.json")
    result = search(ckpt, table, cfg, lambda config: measurer(config.per_stage()), state, log)
    if cfg.finetune:
        result = _finetune(ckpt, result, cfg.finetune, out_path, log)
    result = replace(result, inputs=search_inputs(ckpt, table, cfg))
    result.save(out_path)
    state.unlink(missing_ok=True)
    return result


def search_inputs(ckpt: Checkpoint, table: LatencyTable, cfg: SearchConfig) -> dict:
    """What decides a search's answer: the model, the latency table and the settings."""
    return {"checkpoint": ckpt.digest(), "scheme": ckpt.scheme, "table": _settings_digest(cfg, table),
            "config": asdict(cfg)}


def _finetune(ckpt: Checkpoint, result: SearchResult, epochs: int, out_path: Path, log: Log) -> SearchResult:
    """Train the chosen config for a few epochs (10x below the source lr, as SAA does)."""
    from edgevit.data import load_data
    from edgevit.train import TrainConfig, evaluate, train

    config = SparsityConfig.from_dict(result.sparsity)
    model = ckpt.build_model()
    model.set_sparsity(config)
    d = ckpt.data
    data = load_data(d["spec"], model.cfg.img_size, d.get("seed", 0), d.get("val_fraction", 0.1))
    lr = float(ckpt.config.get("lr", 1e-3)) / 10
    folder = out_path.with_name(out_path.stem + "-finetune")
    tuned = train(model, data, TrainConfig(epochs=epochs, lr=lr, seed=d.get("seed", 0)), folder, stage="finetune")
    m = tuned.build_model().eval()
    m.set_sparsity(config)
    top1 = evaluate(m, data.test, d.get("mean", data.mean), d.get("std", data.std))["top1"]
    log(f"fine-tuned {epochs} epochs at lr {lr:g}: test top-1 {top1:.2f}% ({folder}/model.pt)")
    return replace(result, finetuned_test_top1=top1)


def run_stage(run: StageRun) -> dict:
    """The `search` recipe stage: evolution under [search].budget on [profile]'s target and table;
    writes OUT/search/result.json."""
    from edgevit.targets import load_target

    cfg, target = run.config("search"), load_target(run.config("profile").target)
    out = run.dir("search") / "result.json"
    table = run.dir("profile") / "latency.json"
    ckpt = run.deployed_checkpoint()
    result = _up_to_date_result(out, ckpt, table, cfg) if not run.force else None
    if result is not None:
        run.log(f"search: up to date ({out})")
    else:
        result = run_search(ckpt, target, cfg, out, table if table.exists() else None, log=run.log)
    run.log(f"search: {result.sparsity['ratios']} val {result.val_top1:.2f}% test {result.test_top1:.2f}%, measured "
            f"{result.measured_ms:.3f} ms within {result.budget_ms:g} ms -> {out}")
    return {"result": str(out), "ratios": result.sparsity["ratios"], "test_top1": result.test_top1,
            "measured_ms": result.measured_ms, "predicted_ms": result.predicted_ms}


def _up_to_date_result(path: Path, ckpt: Checkpoint, table_path: Path, cfg: SearchConfig) -> SearchResult | None:
    """The stored result when it was made from this checkpoint, table and settings."""
    if not path.is_file() or not table_path.is_file():
        return None
    try:
        result = SearchResult.load(path)
        table = LatencyTable.load(table_path)
    except EdgeVitError:
        return None
    return result if result.inputs == json.loads(json.dumps(search_inputs(ckpt, table, cfg))) else None
