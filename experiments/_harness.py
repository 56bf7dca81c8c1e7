"""What every experiments/ script shares: one override syntax, one way to start a run, one
results file, one table format. Scripts run from the repository root as `python -m experiments.X`.

  overrides   'field=VALUE' items, VALUE a Python literal: main.py's --config.FIELD=VALUE
              without the prefix (lcm_jax.config_loading parses and checks both).
  build_run   config -> (objective, pipeline): distributed init, the config checks, the data,
              the objective from the registry (main.py trains every config this way).
  ResultsFile OUT/results.json, rewritten atomically after every entry; a rerun skips entries
              already marked done.
  SEEDED      NAME_sK names a replicate trained (and read) at seed K (a bare NAME is seed 0);
              replicate / replicate_name / pool_replicates read and write such names, mean_std
              pools their scores.
  in_study    a study's run config: tracked in W&B (config.wandb.mode, offline by default;
              WANDB_MODE wins) as run OUT-NAME in the group named after OUT; the study's
              table then goes to a `summary` run of that group (tracking.log_results).
"""
from __future__ import annotations

import json
import re
import statistics

from lcm_jax import config_loading, errors, paths


def main(fn) -> None:
    """Run a script's main: bad input prints one line (no traceback) and exits with status 2."""
    errors.cli_main(fn)


def split_run(text: str) -> tuple[str, list[str]]:
    """'NAME:field=VALUE,field=VALUE' -> (NAME, ['field=VALUE', ...]); a comma splits only
    before the next 'field=' (VALUEs may hold commas: tuples, lists)."""
    name, _, sets = text.partition(":")
    return name, [item for item in re.split(r",(?=[A-Za-z_][\w.]*=)", sets) if item]


def configure(config, overrides) -> object:
    """`config` with `overrides` applied ('field=VALUE' items, or a {field: value} dict),
    checked as main.py checks --config.FIELD=VALUE (a misspelt field is refused)."""
    if isinstance(overrides, dict):
        overrides = [f"{k}={v!r}" for k, v in overrides.items()]
    return config_loading.apply(config, list(overrides))


def build_run(config, workdir: str, pipeline=None):
    """(objective, pipeline) for `config`, after every config check: what main.py trains."""
    import jax

    from lcm_jax import config_checks, data, objectives, parallel

    parallel.initialize_distributed(config.parallel)
    parallel.enable_compilation_cache(config.parallel)
    config_checks.validate(config)  # every config problem, before anything compiles
    if pipeline is None:
        pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size,
                                      seed=config.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    return objectives.build(config, workdir, pipeline), pipeline


SEEDED = re.compile(r"^(.+)_s(\d+)$")  # NAME_sK: trained with seed=K, read at sampling seed K


def replicate(name: str) -> tuple[str, int]:
    """(NAME, K) of NAME_sK; a bare NAME is seed 0."""
    seeded = SEEDED.match(name)
    return (seeded.group(1), int(seeded.group(2))) if seeded else (name, 0)


def replicate_name(name: str, seed: int) -> str:
    """NAME at seed K: NAME_sK, NAME itself for seed 0."""
    return f"{name}_s{seed}" if seed else name


def pool_replicates(results: dict, skip=()) -> dict:
    """{NAME: {K: entry}} of the entries NAME / NAME_sK of `results`, less the names in `skip`."""
    pooled = {}
    for name, entry in results.items():
        if name not in skip:
            group, seed = replicate(name)
            pooled.setdefault(group, {})[seed] = entry
    return pooled


def mean_std(values) -> tuple[float, float]:
    """(mean, sample std with ddof 1; 0 for one value) of replicate scores."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def in_study(config, out: str, name: str):
    """`config`, tracked as the run `NAME` of the study in OUT (one W&B group per study)."""
    from lcm_jax import tracking

    group = tracking.group_name(out)
    config.wandb.update(group=group, name=f"{group}-{name}")
    return config


class ResultsFile:
    """A JSON dict at `path`, saved atomically after every change; `done(name)` entries are
    skipped on a rerun."""

    def __init__(self, path: str):
        self.path = paths.path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __getitem__(self, name):
        return self.data[name]

    def __contains__(self, name) -> bool:
        return name in self.data

    def entry(self, name: str, **fields) -> dict:
        """The entry `name` (created with `fields` if absent)."""
        return self.data.setdefault(name, dict(fields))

    def done(self, name: str) -> bool:
        """Present, and not an entry still marked {"done": False} (one a killed run left)."""
        entry = self.data.get(name)
        return entry is not None and not (isinstance(entry, dict) and entry.get("done") is False)

    def set(self, name: str, value) -> None:
        self.data[name] = value
        self.save()

    def finish(self, name: str) -> None:
        self.data[name]["done"] = True
        self.save()

    def save(self) -> None:
        paths.write_atomic(self.path, json.dumps(self.data, indent=2))


def markdown_table(header, rows) -> str:
    """A markdown table: `header` a list of column names, `rows` lists of cells (str() each)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def fd_cell(metrics: dict) -> str:
    """'FD (accuracy%)' of a digits score."""
    return f"{metrics['fd']:.2f} ({metrics['acc']:.1%})"
