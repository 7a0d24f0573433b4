"""The house's shape: rooms import only downward, no module cycle, no private name crosses a module, stages
take explicit inputs (a missing one is a ConfigError naming the key) and only the app layer fills them in."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from sr_ray.core.config import ConfigError

ORDER = ["core", "demo", "reward", "curation", "diffusion", "eval", "analysis", "generations", "bench", "app"]
"""Rooms, lowest first: a module may import its own room and the rooms before it."""


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (ROOT / "sr_ray").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported sr_ray module, name or None)} (function-local imports included)."""
    out: dict[str, set] = {}
    for m, f in mods.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {(a.name, None) for a in node.names if a.name.startswith("sr_ray")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sr_ray"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add((sub, None) if sub in mods else (node.module, a.name))
        out[m] = found
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[-1] in ORDER else "top"


def test_rooms_import_only_downward_with_no_cycle_and_no_private_names():
    mods = _modules()
    imports = _imports(mods)
    rooms = {_room(m) for m in mods} - {"top"}
    assert rooms <= set(ORDER), f"a room missing from ORDER: {rooms - set(ORDER)}"
    upward = sorted(f"{m} -> {t}" for m, ts in imports.items() for t, _ in ts
                    if _room(m) in ORDER and _room(t) in ORDER and ORDER.index(_room(t)) > ORDER.index(_room(m)))
    assert not upward, upward
    private = sorted(f"{m} <- {t}.{n}" for m, ts in imports.items() for t, n in ts
                     if n and n.startswith("_") and not n.startswith("__") and t != m)
    assert not private, private
    graph = {m: {t for t, _ in ts if t in mods and t != m} for m, ts in imports.items()}
    state: dict[str, int] = {}

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in graph[v]:
            assert state.get(w) != 1, f"import cycle: {' -> '.join(path[path.index(w):] + [w])}"
            if w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v, [v])


LAZY = {"sr_ray.reward.model", "sr_ray.reward.score", "sr_ray.reward", "sr_ray.diffusion.components",
        "sr_ray.diffusion.denoiser"}
"""Modules that may be imported inside a function: they load torch/open_clip or diffusers at import, which the
callers (Ray Data tasks, the curation's NSFW hook, the scorers' configs, the CLI) must not pay until used."""


def test_function_local_imports_only_keep_a_heavy_dependency_lazy():
    found = []
    for m, f in _modules().items():
        tree = ast.parse(f.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sr_ray"):
                    if node.module not in LAZY and not (m == "sr_ray.bench.curate" and fn.name == "_child"):
                        found.append(f"{m}.{fn.name} imports {node.module}")
    # bench.curate._child times each side in a fresh interpreter, its own imports included
    assert not found, sorted(set(found))


def test_only_the_app_layer_runs_one_stage_for_another():
    """The demo chain lives in sr_ray.app.defaults: no stage module names another stage's job function."""
    jobs = {"curate", "train_reward", "tune_reward", "score_generations", "select_pairs", "finetune_sd",
            "evaluate_t2i", "compare_rewards"}
    mods = _modules()
    calls = sorted(f"{m} imports {n}" for m, ts in _imports(mods).items() for t, n in ts
                   if _room(m) not in ("app", "bench") and n in jobs and _room(t) != _room(m))
    assert not calls, calls


def test_stages_refuse_a_missing_input_by_name(tmp_path):
    """Each stage called without its input names the key (and that the job fills it), before any work."""
    from sr_ray.curation.curate import CurateConfig, curate
    from sr_ray.diffusion.finetune import FinetuneSDConfig, finetune_sd
    from sr_ray.diffusion.generate import load_prompt_sets
    from sr_ray.eval.compare import CompareConfig, compare_rewards
    from sr_ray.eval.t2i import EvaluateT2IConfig, evaluate_t2i
    from sr_ray.generations.score import ScoreConfig, score_generations
    from sr_ray.generations.select import SelectConfig, select_pairs
    from sr_ray.reward.train import TrainRewardConfig, train_reward

    cases = [
        (lambda: curate(CurateConfig(out=str(tmp_path / "o"))), "log= is required"),
        (lambda: train_reward(TrainRewardConfig()), "data.train is required"),
        (lambda: score_generations(ScoreConfig(out=str(tmp_path / "s"))), "generations= is required"),
        (lambda: score_generations(ScoreConfig(generations=str(tmp_path), out=str(tmp_path / "s"))),
         "checkpoint= is required"),
        (lambda: select_pairs(SelectConfig(out=str(tmp_path / "f"))), "scores= is required"),
        (lambda: finetune_sd(FinetuneSDConfig()), "data.train is required"),
        (lambda: load_prompt_sets([]), "no prompt file given"),
        (lambda: evaluate_t2i(EvaluateT2IConfig(out=str(tmp_path / "e"))), "social_reward.checkpoint is required"),
        (lambda: compare_rewards(CompareConfig(out=str(tmp_path / "c"))), "no preference set given"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            call()
        assert "the job" in str(e.value) or "job" in str(e.value), str(e.value)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_the_job_fills_inputs_from_the_demo_chain(tmp_path, monkeypatch):
    """sr_ray.app.defaults: the scoring job without generations gets the demo set; with them, they are kept;
    the fine-tune job's demo set is cached per special token."""
    from sr_ray.app import defaults
    from sr_ray.core import special_token
    from sr_ray.demo.data import ensure_demo_finetune_set
    from sr_ray.generations.score import ScoreConfig

    seen = []
    monkeypatch.setattr(defaults.batch_score, "score_generations", lambda cfg: seen.append(cfg) or {})
    defaults.score_generations(ScoreConfig(checkpoint="ck", demo={"cache_dir": str(tmp_path), "prompts": 3}))
    assert seen[-1].generations.startswith(str(tmp_path)) and Path(seen[-1].generations, "_SUCCESS").exists()
    defaults.score_generations(ScoreConfig(checkpoint="ck", generations="s3://b/gen"))
    assert seen[-1].generations == "s3://b/gen" and seen[-1].checkpoint == "ck"

    a = ensure_demo_finetune_set({"cache_dir": str(tmp_path), "prompts": 4})
    b = ensure_demo_finetune_set({"cache_dir": str(tmp_path), "prompts": 4}, token="zq quality")
    assert a != b and special_token.read(b, special_token.SET_FILE) == "zq quality"
    assert special_token.read(a, special_token.SET_FILE) == special_token.DEFAULT
