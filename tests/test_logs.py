"""Console and log file of a job: what a person sees, and what is kept."""

import logging

from conure_dist.logs import DriverLog, RunClock, log, sync_driver_log


def test_console_gets_info_the_file_gets_everything_and_remote_logs_are_uploaded(tmp_path, capsys, s3_server):
    with DriverLog(str(tmp_path / "run")):
        log.info("pretrain/train  started")
        log.debug("[pretrain/train] step 5 loss 4.2")
        logging.getLogger("py.warnings").warning("a library warning")  # routed only once Ray is connected
    out = capsys.readouterr().out
    assert out == "pretrain/train  started\n"
    text = (tmp_path / "run" / "logs" / "driver.log").read_text()
    assert "INFO pretrain/train  started" in text and "DEBUG [pretrain/train] step 5 loss 4.2" in text
    # The job's handlers are gone afterwards (pytest's own capture handlers may sit there too).
    assert not [h for h in log.handlers if type(h) in (logging.StreamHandler, logging.FileHandler)]

    bucket = s3_server()
    from conure_dist import storage

    run_dir = f"s3://{bucket}/run"
    with DriverLog(run_dir):
        log.info("first driver")
        sync_driver_log()
        assert "first driver" in storage.read_bytes(f"{run_dir}/logs/driver.log").decode()
    with DriverLog(run_dir):  # a resumed run appends to the same file
        log.info("second driver")
    text = storage.read_bytes(f"{run_dir}/logs/driver.log").decode()
    assert text.index("first driver") < text.index("second driver")


def test_eta_counts_the_stage_the_later_stages_and_each_fits_fixed_cost():
    clock = RunClock()
    clock.fixed_costs = [20.0]  # measured fixed cost of the first stage (it also started the workers)
    clock.plan(remaining_examples=10_000, remaining_fits=3)
    event = {"task": "click", "stage": "train", "epoch": 1, "epochs": 3, "loss": 0.5, "metric": "mrr@5", "value": 0.1234,
             "improved": True, "examples_per_s": 100.0, "seconds": 10.0}
    # stage: 2 epochs x 10 s; run: 20 s + 10,000 / 100 ex/s + 3 stages x 20 s = 180 s
    assert clock.epoch_line(event) == \
        "click/train  epoch 1/3  loss 0.5000  val mrr@5 0.1234 (best)  100 ex/s  ETA stage 0:00:20, run 0:03:00"
    clock.fixed_costs = [20.0, 5.0, 7.0]  # once later ones are measured, the first is left out: 6 s each
    assert clock.epoch_line(event).endswith("ETA stage 0:00:20, run 0:02:18")


def test_the_workers_start_is_counted_once_in_a_session_and_per_fit_in_the_stage_layout(monkeypatch):
    """The first fit of a session also starts the worker group (20 s here): later fits reuse it,
    so the ETA must not charge that start to each of them; with a group per fit it does."""
    import conure_dist.logs as logs

    now = [1000.0]
    monkeypatch.setattr(logs.time, "time", lambda: now[0])
    event = {"task": "pretrain", "stage": "retrain", "epoch": 1, "epochs": 1, "loss": 0.5, "examples_per_s": 100.0,
             "seconds": 2.0, "last": True}
    for per_fit, late in ((False, False), (True, False), (False, True)):
        clock = RunClock(new_workers_per_fit=per_fit)
        clock.begin_fit()
        if not late:
            clock.workers_ready(20.0)
        now[0] += 27.0  # the fit: 20 s of workers' start, 5 s of epochs, 2 s more
        clock.epoch_line({**event, "seconds": 5.0})
        clock.end_fit()
        if late:  # the workers' report reached the driver after the fit had ended
            clock.workers_ready(20.0)
        assert clock.fixed_costs == [2.0]
        clock.plan(remaining_examples=1000, remaining_fits=5)
        # 1000 ex / 100 ex/s + 5 fits x 2 s = 20 s, + 5 x 20 s of workers' start with a group per fit
        run_eta = "0:00:20" if not per_fit else "0:02:00"
        assert clock.epoch_line(event).endswith(f"run {run_eta}"), (per_fit, late)


def test_a_stage_that_ends_at_this_epoch_has_no_stage_eta_and_hours_do_not_wrap():
    clock = RunClock()
    clock.plan(remaining_examples=3_600_000, remaining_fits=0)
    line = clock.epoch_line({"task": "pretrain", "stage": "train", "epoch": 1, "epochs": 10, "loss": 1.0,
                             "examples_per_s": 10.0, "seconds": 50.0, "last": True,  # e.g. its --max-steps
                             "train_s": 40.0, "data_wait_s": 2.0})
    assert line.endswith("10 ex/s  waiting for data 5 %  ETA stage 0:00:00, run 100:00:00")
