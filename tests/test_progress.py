"""Progress bars: the ETA shows from the first finished step, however slow the steps are."""

from rich.progress import Progress

from rlhfkit.progress import MeanRateEta, eta_seconds, format_eta


def test_eta_is_the_mean_step_time_times_the_steps_left():
    assert eta_seconds(10.0, 1, 59) == 590.0
    assert eta_seconds(10.0, 0, 60) is None
    assert eta_seconds(10.0, 5, 0) == 0.0
    assert format_eta(590.0) == "eta 0:09:50" and format_eta(3725.4) == "eta 1:02:05"
    assert format_eta(None) == "eta -:--:--"


def rendered(first: int, completed_after: list[tuple[float, int]], total: int = 60) -> str:
    clock = [0.0]
    bar = Progress(MeanRateEta(), get_time=lambda: clock[0], disable=True)
    task = bar.add_task("sft", total=total, completed=first, first=first)
    for at, completed in completed_after:
        clock[0] = at
        bar.update(task, completed=completed)
    return MeanRateEta().render(bar.tasks[task]).plain


def test_one_slow_step_is_enough_for_an_eta():
    """rich's TimeRemainingColumn showed -:--:-- for all 60 of a slow SFT run's steps."""
    assert rendered(0, []) == "eta -:--:--"
    assert rendered(0, [(45.0, 1)]) == "eta 0:44:15"  # 59 steps left at 45 s each
    assert rendered(0, [(45.0, 1), (135.0, 2)]) == "eta 1:05:15"  # mean 67.5 s x 58


def test_a_resumed_run_counts_only_its_own_steps():
    assert rendered(30, [(10.0, 31)]) == "eta 0:04:50"  # 29 left at 10 s


def test_training_and_generation_bars_use_it():
    from rlhfkit.progress import columns
    from rlhfkit.train.loop import Progress as TrainingBar

    bar = TrainingBar(60, 0, "sft", enabled=True)
    try:
        assert any(isinstance(c, MeanRateEta) for c in bar.bar.columns)
    finally:
        bar.close()
    assert any(isinstance(c, MeanRateEta) for c in columns())
