"""``conure-dist export | predict | score | evaluate``: use a trained run.

    conure-dist export --run-dir runs/demo --out models/demo [--as-of TASK]
    conure-dist predict --model models/demo --task click --input users.txt [--k 5]
    conure-dist score --model models/demo --task click --input users.parquet --output scored/ [--embed]
    conure-dist evaluate --model models/demo --data runs/demo/data
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator, TextIO

from conure_dist.serve.artifact import ModelFileError

PAD_TOKEN = "0"  # the TTL files' padding token


def add_serve_parsers(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="write a trained run as one model directory that serves every committed task",
        description="Write RUN_DIR's model (as of its last commit, or --as-of TASK) to --out: weights, owner map, "
                    "every exported task's head, the item and label vocabularies, config and checksums.")
    export.add_argument("--run-dir", required=True, help="the run directory (local path or URI)")
    export.add_argument("--out", required=True, help="the model directory to write (local path or URI)")
    export.add_argument("--as-of", metavar="TASK", help="export the model as it was when TASK was committed "
                                                        "(default: the last committed task)")
    export.add_argument("--data", help="the prepared dataset the run was trained on, if the run's own path to it "
                                       "no longer reaches it (its vocabularies go into the model)")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    export.set_defaults(func=_export)

    predict = subparsers.add_parser(
        "predict", help="predict for a few users given as item tokens; JSON lines out",
        description="One user per input line: comma-separated item tokens, oldest first (the TTL files' format; "
                    "the token 0 is padding and a ',,labels' part is ignored), a JSON list of tokens, or a JSON "
                    "object with `seq` (and optionally `user`). Prints one JSON object per input line.")
    _model_task_input(predict, "the file of users, or - for standard input")
    predict.add_argument("--exclude-seen", action="store_true", help="never recommend an item already in the sequence")
    predict.add_argument("--embed", action="store_true", help="print each user's representation instead")
    predict.set_defaults(func=_predict)

    score = subparsers.add_parser(
        "score", help="score or embed a Parquet dataset of users with Ray Data (Parquet out)",
        description="Read Parquet with a `seq` column (item tokens per user, oldest first; other columns are "
                    "passed through), score every row with a pool of model actors, write Parquet to --output.")
    _model_task_input(score, "Parquet file or directory (local path or URI)")
    score.add_argument("--output", required=True, help="output directory (local path or URI)")
    score.add_argument("--embed", action="store_true", help="write the user representation instead of predictions")
    score.add_argument("--ids", action="store_true",
                       help="`seq` holds the model's item ids (a prepared dataset's rows), not tokens")
    score.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    score.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per actor (default 1)")
    score.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per actor (default 0: CPU)")
    score.add_argument("--batch-size", type=int, default=1024, help="rows per model call (default 1024)")
    score.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="compute precision (default float32)")
    score.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    score.set_defaults(func=_score)

    evaluate = subparsers.add_parser(
        "evaluate", help="a model's test metrics on its prepared dataset, next to the run's at commit",
        description="Evaluate each task of a model directory on a split of the prepared dataset it was trained on, "
                    "exactly as the run evaluated it, and compare with the metrics recorded at its commit.")
    evaluate.add_argument("--model", required=True, help="a model directory (conure-dist export)")
    evaluate.add_argument("--data", help="the prepared dataset (default: the one recorded at export)")
    evaluate.add_argument("--task", action="append", help="a task (repeat; default: every task)")
    evaluate.add_argument("--split", choices=["train", "validation", "test"], default="test")
    evaluate.set_defaults(func=_evaluate)


def _model_task_input(parser, input_help: str) -> None:
    parser.add_argument("--model", required=True, help="a model directory (conure-dist export)")
    parser.add_argument("--task", required=True, help="the task to serve")
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--k", type=int, default=5, help="items or labels per user (default 5)")


def _export(args) -> int:
    from conure_dist.serve.artifact import export_model

    doc = export_model(args.run_dir, args.out, as_of=args.as_of, data=args.data, overwrite=args.overwrite)
    size = sum(f["bytes"] for f in doc["files"].values())
    tasks = ", ".join(t["name"] for t in doc["tasks"])
    print(f"exported {doc['source']['run_dir']} as of {doc['source']['as_of']}'s commit -> {args.out} "
          f"({size / 1e6:.2f} MB; tasks: {tasks})")
    for task, why in doc["source"]["left_out"].items():
        print(f"left out: {task} ({why})")
    return 0


def read_users(stream: TextIO) -> Iterator[tuple[int, Any, list[str] | None, str | None]]:
    """``(line number, user, tokens, error)`` for each non-empty line of a predict input."""
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if not text:
            continue
        user, tokens, error = None, None, None
        if text[0] in "[{":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield number, None, None, f"not valid JSON ({e.msg})"
                continue
            if isinstance(value, dict):
                user, value = value.get("user"), value.get("seq")
            if not isinstance(value, list):
                error = "expected a list of item tokens, or an object with a `seq` list"
            else:
                tokens = [str(t) for t in value]
        else:
            tokens = [t.strip() for t in text.split(",,")[0].split(",") if t.strip() and t.strip() != PAD_TOKEN]
        yield number, user, tokens, error


def _predict(args) -> int:
    from conure_dist.serve.model import load

    model = load(args.model)
    model._check(args.task)
    if args.k < 1:
        raise ModelFileError(f"--k: must be >= 1, got {args.k}")
    name = "<stdin>" if args.input == "-" else args.input
    try:
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    except OSError as e:
        raise ModelFileError(f"--input {args.input}: {e.strerror}") from None
    with stream:
        rows = list(read_users(stream))
    good = [r for r in rows if r[3] is None]
    enc = model.encode([r[2] for r in good], model.window(args.task))
    if args.embed:
        ok = [i for i, p in enumerate(enc.problems) if p is None]
        vectors = model.representation(args.task, enc.ids[ok]).tolist() if ok else []
        results = [{"error": p} if p else {"embedding": None} for p in enc.problems]
        for i, vec in zip(ok, vectors):
            results[i]["embedding"] = [round(v, 6) for v in vec]
    else:
        results = model.predict_encoded(args.task, enc, args.k, args.exclude_seen)
    by_line = {r[0]: res for r, res in zip(good, results)}
    failed = 0
    for number, user, _, error in rows:
        out = {"line": number, **({"user": user} if user is not None else {}), "task": args.task}
        res = by_line.get(number, {"error": error})
        out.update(res)
        if "error" in res:
            failed += 1
            print(f"{name}:{number}: skipped: {res['error']}", file=sys.stderr)
        elif res.get("unknown"):
            print(f"{name}:{number}: unknown item tokens {res['unknown'][:5]}{' ...' if len(res['unknown']) > 5 else ''}",
                  file=sys.stderr)
        print(json.dumps(out))
    if rows and failed == len(rows):
        print(f"error: no line of {name} could be served", file=sys.stderr)
        return 1
    return 0


def _score(args) -> int:
    from conure_dist.launch import connect_ray
    from conure_dist.serve.score import score

    for option in ("k", "workers", "batch_size"):
        if getattr(args, option) < 1:
            raise ModelFileError(f"--{option.replace('_', '-')}: must be >= 1, got {getattr(args, option)}")
    connect_ray()
    summary = score(args.model, args.task, args.input, args.output, k=args.k, embed=args.embed, ids=args.ids,
                    workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                    batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite)
    print(summary.line())
    return 0


def _evaluate(args) -> int:
    from conure_dist.serve.model import load

    model = load(args.model)
    data = args.data or model.doc["source"]["dataset"]
    tasks = args.task or list(model.tasks)
    rows, differ = [("task", "metric", "value", "at commit", "")], 0
    for task in tasks:
        recorded = model.task_info(task)["test_at_commit"]
        for metric, value in model.evaluate(task, data, args.split).items():
            if metric == "count":
                continue
            at_commit = recorded.get(metric) if args.split == "test" else None
            same = "" if at_commit is None else ("equal" if at_commit == value else "DIFFERS")
            differ += same == "DIFFERS"
            rows.append((task, metric, f"{value:.6f}", "" if at_commit is None else f"{at_commit:.6f}", same))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 1 if differ else 0
