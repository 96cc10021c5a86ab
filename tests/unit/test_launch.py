"""Launch and scale: paper-scale recipes build without files, nemo-run's generated Slurm and local
scripts carry the right topology / rendezvous / container / NCCL settings, `dualrpo launch --dryrun`
works through the CLI, and bad flags are named."""
import math
import os
import subprocess
import sys

import pytest

from dualrpo_mcore.trainer.recipes import RECIPES, build_recipe
from dualrpo_mcore.trainer.recipes_paper import (ORSTA_TRAIN, PAPER_TOTAL, default_world,
                                                 discover_orsta)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEMO_REASON = "nemo-run is not installed (pip install 'dualrpo-mcore[launch]'); the launch tests need it"
PAPER = ["qwen2_5_vl_7b_paper", "qwen2_5_vl_7b_paper_grpo", "qwen2_5_vl_32b"]


@pytest.fixture
def nemo_run(monkeypatch):
    mod = pytest.importorskip("nemo_run", reason=NEMO_REASON)
    # nemo-run's local tunnel runs `mkdir` through invoke, which forwards our stdin to the child;
    # pytest's captured stdin refuses reads, so give it an empty real file instead.
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield mod


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_build_without_files(name, tmp_path):
    cfg = build_recipe(name, str(tmp_path / "absent"), None, str(tmp_path / "run"))
    nodes, gpus = default_world(name)
    par = cfg.actor.parallel
    assert (nodes * gpus) % (par.tp * par.pp) == 0
    layout = RECIPES.get(name).layout  # what the launcher reads without building the config
    assert (par.tp, par.pp) == (layout.tp, layout.pp)
    assert cfg.actor.model.preset == ("qwen2.5-vl-32b" if "32b" in name else "qwen2.5-vl-7b")
    assert cfg.actor.model.precision == "bf16" and cfg.actor.model.spec_backend == "te"
    assert cfg.actor.model.recompute == "full"  # what `dualrpo plan` needs for 80 GB (tests/unit/test_plan.py)
    assert cfg.rollout.engine == "sglang" and 0 < cfg.rollout.engine_options["mem_fraction_static"] < 1
    assert cfg.reward.mode == ("grpo" if name.endswith("grpo") else "dualrpo")
    assert (cfg.reward.mu, cfg.reward.lam, cfg.actor.kl.beta_min) == (0.01, 0.005, 0.05)
    assert cfg.actor.optim.lr == 1e-6 and cfg.actor.optim.warmup_fraction == 0.05
    assert cfg.actor.optim.distributed_optimizer
    # one epoch of the 47.7K samples, weights = the files' sample counts
    assert cfg.schedule.steps == math.ceil(PAPER_TOTAL / cfg.schedule.prompts_per_step)
    assert len(cfg.data.sources) == 18 and sum(s.weight for s in cfg.data.sources) == PAPER_TOTAL
    assert {s.name.split("/")[0] for s in cfg.data.sources} == {
        "math", "puzzle", "science", "chart", "detection", "grounding", "counting", "ocr"}
    assert cfg.to_dict()["reward_mode"] == cfg.reward.mode  # the tree serialises (config.json)


def test_paper_recipe_takes_train_cli_overrides(tmp_path):
    """`dualrpo train`'s flags reach a paper recipe as --set entries (the launcher passes tp/pp always)."""
    cfg = build_recipe("qwen2_5_vl_7b_paper", str(tmp_path), "/models/7b", str(tmp_path / "r"),
                       ["reward.mode=internal"], tp=4, pp=1, steps=3)
    assert (cfg.actor.parallel.tp, cfg.schedule.steps, cfg.reward.mode) == (4, 3, "internal")
    assert cfg.actor.model.hf_dir == "/models/7b" and cfg.actor.model.preset is None
    assert cfg.tokenizer_path == "/models/7b"
    with pytest.raises(TypeError, match="unknown settings.*nope"):
        build_recipe("qwen2_5_vl_7b_paper", str(tmp_path), None, str(tmp_path / "r"), nope=1)


def test_orsta_files_present_rule_the_mix(tmp_path):
    for f in ("train_math_mmmath_30.parquet", "train_puzzle_puzzlevqa_20_x2.parquet", "notes.parquet"):
        (tmp_path / f).write_bytes(b"")
    found = discover_orsta(str(tmp_path))
    assert [(s.task, s.source, s.samples) for _, s in found] == [("math", "mmmath", 30), ("puzzle", "puzzlevqa", 40)]
    cfg = build_recipe("qwen2_5_vl_7b_paper", str(tmp_path), None, str(tmp_path / "r"))
    assert [s.weight for s in cfg.data.sources] == [30.0, 40.0] and cfg.schedule.steps == 1


def test_orsta_table_marks_what_is_verified():
    assert sum(s.samples for s in ORSTA_TRAIN) == PAPER_TOTAL and len(ORSTA_TRAIN) == 18
    assert {s.source for s in ORSTA_TRAIN if s.verified} == {"mmmath", "puzzlevqa", "chartqapro", "v3det"}


def test_default_world():
    """The world is registered with each recipe (no table keyed by name), its layout fits it, and the
    config's parallel section is that layout."""
    import dualrpo_mcore.trainer.recipes_paper as paper
    from dualrpo_mcore.launch.nemo import recipe_parallel
    from dualrpo_mcore.trainer.recipes import RECIPES, Layout, recipe_layout

    assert not hasattr(paper, "RECIPE_WORLD")
    assert default_world("tiny_cpu") == (1, 2) and default_world("qwen2_5_vl_32b") == (4, 8)
    for name in RECIPES.names():
        layout = recipe_layout(name)
        assert layout.world % (layout.tp * layout.pp) == 0 and recipe_parallel(name) == (layout.tp, layout.pp)
    assert recipe_layout("qwen2_5_vl_32b") == Layout(tp=4, pp=4, nodes=4, gpus_per_node=8)
    with pytest.raises(KeyError, match="known"):
        default_world("nope")
    with pytest.raises(ValueError, match="do not split"):
        Layout(tp=4, pp=1, nodes=1, gpus_per_node=2)


# ---------------------------------------------------------------- launch (nemo-run)
def _slurm_script(tmp_path, **kw):
    from dualrpo_mcore.launch import nemo

    job = nemo.TrainJob(recipe="qwen2_5_vl_32b", data="/lustre/orsta", out="/lustre/runs/32b",
                        init="/lustre/models/32b", extra_args=["--steps", "5"])
    opts = nemo.SlurmOptions(account="acct", partition="batch", container_image="nvcr.io/nvidia/pytorch:25.01-py3",
                             container_mounts=["/lustre:/lustre", "/scratch:/scratch:ro"], **kw)
    job.check_world(opts.world, "test")
    result = nemo.run_experiment("t", [("train", nemo.train_task(job), nemo.slurm_executor(opts, str(tmp_path)))],
                                 str(tmp_path), dryrun=True)
    assert result.ok and not result.states
    return result.scripts["train"]


def test_slurm_dryrun_multinode_script(nemo_run, tmp_path):
    s = _slurm_script(tmp_path, nodes=4, gpus_per_node=8, time="1-00:00:00")
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct",
                 "#SBATCH --partition=batch", "#SBATCH --time=1-00:00:00", "#SBATCH --exclusive",
                 # the torchrun launcher: one task per node, torchrun spawns the 8 GPU processes
                 "#SBATCH --ntasks-per-node=1"):
        assert line in s, line
    for piece in ("torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500", "--nnodes 4",
                  "--nproc-per-node 8", "--node-rank $SLURM_NODEID", "head_node_ip=$(srun",
                  "--container-image nvcr.io/nvidia/pytorch:25.01-py3",
                  "--container-mounts /lustre:/lustre,/scratch:/scratch:ro,",
                  "-m dualrpo_mcore train --recipe qwen2_5_vl_32b --data /lustre/orsta --out /lustre/runs/32b "
                  "--tp 4 --pp 4 --init /lustre/models/32b --no-progress --steps 5"):
        assert piece in s, piece
    for env in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "TORCH_NCCL_AVOID_RECORD_STREAMS=1", "NCCL_IB_HCA=mlx5",
                "NCCL_SOCKET_IFNAME=^lo,docker", "NCCL_IB_TIMEOUT=22", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1"):
        assert f"export {env}" in s, env
    # logs + sbatch script live in the nemo-run experiment folder
    assert f"--output={tmp_path}/experiments/t/" in s


def test_slurm_env_overrides_and_unsets(nemo_run, tmp_path):
    s = _slurm_script(tmp_path, nodes=2, gpus_per_node=8, ib_hca=None, socket_ifname="ib0",
                      env={"NCCL_DEBUG": "INFO"})
    assert "NCCL_IB_HCA" not in s and "export NCCL_SOCKET_IFNAME=ib0" in s and "export NCCL_DEBUG=INFO" in s
    assert "--nnodes 2" in s and "export NCCL_DEBUG=WARN" not in s


def test_local_dryrun_is_torchrun_on_this_interpreter(nemo_run, tmp_path):
    from dualrpo_mcore.launch import nemo

    job = nemo.TrainJob(recipe="tiny_cpu", data="/d", out="/o", tp=2)
    ex = nemo.local_executor(nemo.LocalOptions(nproc_per_node=2, env={"OMP_NUM_THREADS": "1"}))
    s = nemo.run_experiment("t", [("tiny", nemo.train_task(job), ex)], str(tmp_path), dryrun=True).scripts["tiny"]
    for piece in ("'torchrun'", "'--nproc-per-node',", "'--nnodes',", "'-m',", "'dualrpo_mcore',", "'--tp',",
                  os.path.dirname(sys.executable), "'OMP_NUM_THREADS': '1'"):
        assert piece in s, piece


def test_launch_cli_dryrun(nemo_run, tmp_path, capsys):
    from dualrpo_mcore.cli import main

    rc = main(["launch", "--recipe", "qwen2_5_vl_7b_paper", "--data", "/d", "--out", str(tmp_path / "run"),
               "--init", "/m", "--executor", "slurm", "--account", "a", "--container", "img", "--nodes", "2",
               "--mount", "/d:/d", "--dryrun", "--", "--steps", "3", "--reward-mode", "grpo"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "#SBATCH --nodes=2" in out and "--nproc-per-node 8" in out and "--nnodes 2" in out
    assert "--tp 2 --pp 1 --init /m --no-progress --steps 3 --reward-mode grpo" in out
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing ran


@pytest.mark.parametrize("flags,named", [
    (["--executor", "slurm", "--container", "img"], "--account"),
    (["--executor", "slurm", "--account", "a", "--mount", "/d:/d"], "--mount needs --container"),
    (["--executor", "slurm", "--account", "a", "--container", "i", "--signal", "soon"], "--signal"),
    (["--executor", "slurm", "--account", "a", "--container", "i", "--mount", "nocolon"], "--mount"),
    (["--executor", "slurm", "--account", "a", "--container", "i", "--time", "soon"], "--time"),
    (["--executor", "slurm", "--account", "a", "--container", "i", "--gpus-per-node", "3"], "tp=2"),
    (["--env", "NOVALUE"], "--env"),
    (["--nodes", "2"], "--nodes"),
    (["--tp", "0"], "--tp"),
    (["--", "--tp", "4"], "--tp after `--`"),
])
def test_launch_cli_names_bad_flags(nemo_run, tmp_path, capsys, flags, named):
    from dualrpo_mcore.cli import main

    rc = main(["launch", "--recipe", "qwen2_5_vl_7b_paper", "--data", "/d", "--out", str(tmp_path), "--dryrun",
               *flags])
    assert rc == 2 and named in capsys.readouterr().err


def test_missing_nemo_run_names_the_extra(monkeypatch):
    from dualrpo_mcore.launch import nemo

    monkeypatch.setitem(sys.modules, "nemo_run", None)  # import fails as if not installed
    with pytest.raises(nemo.LaunchError, match=r"dualrpo-mcore\[launch\]"):
        nemo.require_nemo_run()


def test_examples_help_and_scaling_dryrun(nemo_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for script in ("tiny_cpu.py", "qwen2_5_vl_7b_paper.py", "qwen2_5_vl_32b.py", "scaling_study.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--help"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "scaling_study.py"), "--data", "/d",
                           "--out", str(tmp_path), "--init-7b", "/m7", "--init-32b", "/m32", "--account", "a",
                           "--container", "img", "--nodes", "1", "2", "--dryrun"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("# ---- job")]
    assert len(jobs) == 3  # 7b x {1, 2} nodes, 32b x {2}; 32b on 1 node cannot hold TP=8 x PP=2
    assert "skipped 32b_n1" in proc.stderr
