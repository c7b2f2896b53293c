"""The run config: shipped presets, precedence, per-task overrides, clear errors, and every
hyperparameter of the paper's settings reaching the worker (the experiment as the worker
deserialises it, and what the worker builds from it)."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from conure_dist import runconfig
from conure_dist.config import ConfigError, ExperimentConfig
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.jobs import ttl as ttl_job
from conure_dist.launch import build_experiment, dry_run_report, parse_gpu_memory, resolve_config

TINY = SyntheticConfig(num_users=200, num_items=50, seq_len=8, min_seq_len=3, num_topics=4, click_labels=8,
                       like_labels=8, rows_per_shard=100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(TINY, path, seed=0)
    return path


def experiment(argv, dataset, preset="ttl") -> ExperimentConfig:
    cfg = resolve_config(ttl_job.get_args(["--data", dataset, *argv]), preset)
    return build_experiment(runconfig.to_run_config(cfg), dataset)


def as_the_worker_gets_it(exp: ExperimentConfig) -> ExperimentConfig:
    """The executor ships ``exp.to_dict()`` in the loop config; the worker rebuilds it."""
    return ExperimentConfig.from_dict(json.loads(json.dumps(exp.to_dict())))


def leaves(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


@pytest.mark.parametrize("name", ["ttl", "movielens", "demo"])
def test_each_preset_is_complete_valid_and_printable(name):
    text = runconfig.preset_text(name)
    shipped = set(leaves(yaml.safe_load(text)))
    schema = set(leaves(yaml.safe_load(runconfig.to_yaml(OmegaConf.structured(runconfig.RunConfig)))))
    # Every key of the schema is written out (a user copies a complete, commented file).
    assert schema - {"tasks", "deepspeed"} <= shipped
    rc = runconfig.to_run_config(runconfig.load_config(name))
    assert rc.model.embed_dim >= 1


def test_the_ttl_preset_is_the_papers_setting():
    rc = runconfig.to_run_config(runconfig.load_config("ttl"))
    assert rc.model.embed_dim == 256 and rc.model.dilations == [1, 2, 4, 8] * 4 and rc.model.kernel_size == 3
    assert (rc.first_task.lr, rc.first_task.batch_size, rc.first_task.sample_ratio, rc.first_task.l2) == (1e-3, 32, 0.2, 0.0)
    assert (rc.later_tasks.lr, rc.later_tasks.batch_size, rc.later_tasks.bpr_rho, rc.later_tasks.l2) == (1e-4, 512, 0.3, 0.02)
    assert rc.prune_ratios == [0.7, 0.8, 0.9, 0.8, 0.9, 0.9] and rc.tasks["like"].l2 == 0.05
    ml = runconfig.to_run_config(runconfig.load_config("movielens"))
    assert ml.model.dilations == [1, 2, 4, 8] * 6 and ml.prune_ratios[:3] == [0.7, 0.8, 0.7] and ml.seq_len == 30


def test_config_show_prints_the_shipped_file(capsys):
    from conure_dist.cli import main

    assert main(["config", "show", "ttl"]) == 0
    assert capsys.readouterr().out == runconfig.preset_text("ttl")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("conure-dist ")


def test_precedence_preset_then_files_then_command_line(dataset, tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("later_tasks: {lr: 0.003, patience: 7}\ntasks: {click: {lr: 0.004}}\ncluster: {num_workers: 3}\n")
    b = tmp_path / "b.yaml"
    b.write_text("later_tasks: {patience: 9}\n")
    exp = experiment(["--config", str(a), "--config", str(b)], dataset)
    click, like = exp.task("click").train, exp.task("like").train
    assert (click.lr, like.lr, like.patience, exp.cluster.num_workers) == (0.004, 0.003, 9, 3)
    assert exp.task("like").train.l2 == 0.05  # the preset's per-task override survives
    exp = experiment(["--config", str(a), "--workers", "1", "--set", "tasks.click.lr=0.005", "--epochs", "2"], dataset)
    assert (exp.task("click").train.lr, exp.cluster.num_workers) == (0.005, 1)
    assert {t.train.epochs for t in exp.tasks} == {2}


# (flag or --set, value, what the worker sees)
HYPERPARAMETERS = [
    ("first_task.lr", 0.0007, lambda e: e.tasks[0].train.lr == 0.0007),
    ("later_tasks.lr", 0.0002, lambda e: e.task("click").train.lr == 0.0002),
    ("later_tasks.l2", 0.01, lambda e: e.task("click").train.l2 == 0.01),
    ("tasks.like.l2", 0.07, lambda e: e.task("like").train.l2 == 0.07),
    ("later_tasks.l2_scope", "trainable", lambda e: e.task("age").train.l2_scope == "trainable"),
    ("later_tasks.optimizer", "adamw", lambda e: e.task("click").train.optimizer == "adamw"),
    ("later_tasks.weight_decay", 0.001, lambda e: e.task("click").train.weight_decay == 0.001),
    ("later_tasks.patience", 4, lambda e: e.task("age").train.patience == 4),
    ("first_task.sample_ratio", 0.5, lambda e: e.tasks[0].train.sample_ratio == 0.5),
    ("first_task.sampler", "uniform", lambda e: e.tasks[0].train.sampler == "uniform"),
    ("later_tasks.bpr_rho", 0.6, lambda e: e.task("like").train.bpr_rho == 0.6),
    ("later_tasks.metric_k", 10, lambda e: e.task("click").train.metric_k == 10),
    ("first_task.batch_size", 48, lambda e: e.tasks[0].train.batch_size == 48),
    ("later_tasks.batch_size", 96, lambda e: e.task("click").train.batch_size == 96),
    ("first_task.epochs", 4, lambda e: e.tasks[0].train.epochs == 4),
    ("later_tasks.retrain_epochs", 2, lambda e: e.task("click").train.retrain_epochs == 2),
    ("model.backbone", "transformer", lambda e: e.model.backbone == "transformer"),
    ("model.embed_dim", 24, lambda e: e.model.embed_dim == 24),
    ("model.kernel_size", 5, lambda e: e.model.kernel_size == 5),
    ("model.dilations", [1, 4], lambda e: e.model.dilations == (1, 4)),
    ("model.prune_embedding", True, lambda e: e.model.prune_embedding is True),
    ("tasks.click.embedding_prune_ratio", 0.5, lambda e: e.task("click").spec.embedding_prune_ratio == 0.5),
    ("prune_ratios", [0.5, 0.6, 0.7, 0.8, 0.9, 0.9], lambda e: e.tasks[1].spec.prune_ratio == 0.6),
    ("seq_len", 12, lambda e: e.seq_len == 12),
    ("seed", 11, lambda e: e.seed == 11 and e.tasks[2].train.seed == 11),
    ("shuffle_buffer_rows", 0, lambda e: e.shuffle_buffer_rows == 0),
    ("cluster.zero_stage", 2, lambda e: e.cluster.zero_stage == 2),
    ("cluster.reader", "parquet", lambda e: e.cluster.reader == "parquet"),
    ("deepspeed", {"gradient_clipping": 1.0}, lambda e: e.deepspeed == {"gradient_clipping": 1.0}),
]


@pytest.mark.parametrize("source", ["config-file", "command-line"])
@pytest.mark.parametrize("key,value,seen", HYPERPARAMETERS, ids=[h[0] for h in HYPERPARAMETERS])
def test_every_hyperparameter_reaches_the_worker(dataset, tmp_path, source, key, value, seen):
    default = as_the_worker_gets_it(experiment([], dataset))
    assert not seen(default), f"{key}: the preset already has {value!r}; the test would prove nothing"
    if source == "config-file":
        tree = value
        for part in reversed(key.split(".")):
            tree = {part: tree}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        argv = ["--config", str(path)]
    else:
        argv = ["--set", f"{key}={json.dumps(value)}"]
    assert seen(as_the_worker_gets_it(experiment(argv, dataset)))


def test_the_worker_builds_its_model_and_deepspeed_config_from_those_settings(dataset):
    from conure_dist.model import ConureModel
    from conure_dist.train.engine import EngineSettings, deepspeed_config

    exp = as_the_worker_gets_it(experiment(["--set", "model.kernel_size=5", "--set", "model.dilations=[1,4]",
                                            "--set", "later_tasks.optimizer=adamw", "--set", "later_tasks.lr=0.0002",
                                            "--set", "deepspeed={gradient_clipping: 1.0}"], dataset))
    model = ConureModel(exp.model, [t.spec for t in exp.tasks])
    block = model.backbone.blocks[0]
    assert len(model.backbone.blocks) == 1 and block.conv2.kernel_size == 5 and block.conv2.dilation == 4
    ds = deepspeed_config(exp.task("click").train, EngineSettings(0, "fp32", 8), exp.deepspeed)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.0002
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("text,message", [
    ("later_tasks:\n  lr: fast\n", "c.yaml: later_tasks.lr: Value 'fast'"),
    ("later_tasks:\n  learning_rate: 0.1\n", "c.yaml: later_tasks.learning_rate: Key 'learning_rate' not in"),
    ("model: {embed_dim: 16\n", "c.yaml:2: not valid YAML"),
    ("- a list\n", "c.yaml: a config file holds a mapping"),
    ("later_tasks: {lr: -1}\n", "later_tasks / tasks.click: train.lr: must be > 0"),
    ("tasks: {clcik: {lr: 0.1}}\n", "tasks: overrides for ['clcik']"),
    ("task_order: [click, pretrain]\n", "T1 must be a sequence task"),
    ("deepspeed: {zero_optimization: {stage: 3}}\n", "deepspeed.zero_optimization.stage: set by conure_dist"),
    ("deepspeed: {zero_optimization: {offload_optimizer: {device: cpu}}}\n", "offload is untested"),
    ("deepspeed: {fp16: {enabled: true}}\n", "deepspeed.fp16: refused"),
    ("cluster: {reader: csv}\n", "cluster.reader: one of auto, files, parquet; got 'csv'"),
])
def test_bad_config_files_are_refused_naming_the_file_and_key(dataset, tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        experiment(["--config", str(path)], dataset)
    assert message in str(e.value)


def test_print_config_prints_the_resolved_config_that_reproduces_the_run(dataset, tmp_path, capsys):
    assert ttl_job.main(["--data", dataset, "--set", "tasks.click.lr=0.004", "--workers", "1", "--print-config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    again = experiment(["--config", str(saved)], dataset)
    assert again == experiment(["--set", "tasks.click.lr=0.004", "--workers", "1"], dataset)
    assert yaml.safe_load(printed)["tasks"]["click"]["lr"] == 0.004


def test_dry_run_checks_the_batch_split_and_a_named_gpu(dataset):
    exp = experiment(["--workers", "8", "--gpus-per-worker", "1"], dataset)
    report = dry_run_report(exp, parse_gpu_memory("a10g"))
    assert "task pretrain: global batch 32 over 8 workers is a micro-batch of 4" in report
    assert "fits in 24.0 GiB" in report
    assert "smaller than the 64 workers" in dry_run_report(experiment(["--workers", "64"], dataset), None)
    assert parse_gpu_memory("80GiB") == 80 * 2**30 and parse_gpu_memory("24GB") == 24 * 10**9
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_gpu_memory("lots")


def test_deepspeed_config_file_is_merged(dataset, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 50_000_000}}))
    exp = experiment(["--deepspeed-config", str(path)], dataset)
    assert exp.deepspeed == {"zero_optimization": {"reduce_bucket_size": 50_000_000}}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        experiment(["--deepspeed-config", str(tmp_path / "bad.json")], dataset)


def test_the_presets_per_task_settings_apply_by_name_and_a_users_typo_is_refused(tmp_path, capsys):
    import numpy as np
    import pyarrow as pa

    from conure_dist.data.writer import DatasetWriter
    from conure_dist.launch import main_guard

    with DatasetWriter(str(tmp_path / "d"), seed=0, source="t") as w:  # no task named "like"
        w.add_task("clicks", "sequence")
        w.add_task("gender", "class")
        users = np.arange(40)
        seqs = pa.array([[1 + u % 9, 2 + u % 7, 3] for u in range(40)], pa.list_(pa.int32()))
        w.write("clicks", users, seqs)
        w.write("gender", users, seqs, labels=users % 2)
        w.finish(num_items=10, item_tokens=[str(i) for i in range(1, 11)], label_tokens={"gender": ["f", "m"]})
    data = str(tmp_path / "d")
    assert ttl_job.main(["--data", data, "--workers", "1", "--dry-run"]) == 0  # the ttl preset's tasks.like
    assert "clicks (sequence" in capsys.readouterr().out
    assert main_guard(ttl_job.main, ["--data", data, "--set", "tasks.gendr.l2=0.1", "--dry-run"]) == 2
    assert "tasks: overrides for ['gendr']" in capsys.readouterr().err


def test_a_config_file_layers_on_the_presets_per_task_settings_and_null_removes_one(dataset, tmp_path):
    """``tasks`` entries merge key by key with the layers below: a file that leaves a task out, or
    gives ``tasks: {}``, keeps the preset's overrides; ``null`` removes one."""
    like = {t.spec.name: t for t in experiment([], dataset).tasks}["like"]
    later = runconfig.to_run_config(runconfig.load_config("ttl")).later_tasks
    assert like.train.l2 == 0.05 != later.l2  # the ttl preset's tasks.like.l2
    for text in ("tasks: {}\n", "tasks: {click: {lr: 0.004}}\n"):
        (tmp_path / "layer.yaml").write_text(text)
        assert {t.spec.name: t for t in experiment(["--config", str(tmp_path / "layer.yaml")], dataset).tasks}[
            "like"].train.l2 == 0.05
    (tmp_path / "layer.yaml").write_text("tasks: {like: {l2: null}}\n")
    for argv in (["--config", str(tmp_path / "layer.yaml")], ["--set", "tasks.like.l2=null"]):
        assert {t.spec.name: t for t in experiment(argv, dataset).tasks}["like"].train.l2 == later.l2
