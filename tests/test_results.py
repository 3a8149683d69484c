"""The names of ctclab's measurements: derived per decoder, read back from older runs, and the
one-line summaries the stages print."""
import time

from ctclab.metrics import Score
from ctclab.results import (TIMING, EpochClock, EpochRow, TrainSummary, describe_eval, describe_test, eval_metrics,
                            eval_scores, recorded, submit_scores)
from ctclab import verify


def test_every_decoder_gets_a_distance_and_a_per():
    result = eval_scores({"greedy": Score(2.5, 0.125, 4), "beam": Score(2.25, 0.1, 4), "mine": Score(3.0, 0.2, 4)}, 10)
    assert result == {"dev_lev_greedy": 2.5, "dev_per_greedy": 0.125, "dev_lev_beam": 2.25, "dev_per_beam": 0.1,
                      "dev_lev_mine": 3.0, "dev_per_mine": 0.2, "beam_width": 10}
    assert eval_metrics(["greedy", "mine"]) == ("dev_lev_greedy", "dev_per_greedy", "dev_lev_mine", "dev_per_mine")
    # greedy first, then the submission's beam, then the others, whatever order the file has
    assert describe_eval(dict(sorted(result.items()))) == (
        "dev Levenshtein greedy 2.500, beam(10) 2.250, mine 3.000, PER 10.0%")
    assert describe_test(submit_scores(Score(3.1416, 0.174, 120))) == "; test Levenshtein 3.142, PER 17.4%"
    assert describe_test({"rows": 7}) == ""


def test_older_runs_are_read_under_their_names():
    schema1 = {"eval_dev_lev_beam": 2.4, "eval_dev_per": 0.12}  # the beam's PER had no decoder in its name
    assert recorded(schema1, "dev_per_beam", "eval_") == 0.12 and recorded(schema1, "dev_lev_beam", "eval_") == 2.4
    assert recorded({"dev_lev_beam": 2.0}, "dev_lev_beam", "eval_") == 2.0  # before the eval_ prefix
    assert recorded(schema1, "dev_per_greedy", "eval_") is None
    assert describe_eval({"dev_lev_greedy": 2.5, "dev_lev_beam": 2.4, "dev_per": 0.12, "beam_width": 4}) == (
        "dev Levenshtein greedy 2.500, beam(4) 2.400, PER 12.0%")
    # verify compares what the recorded commit logged, under its own names, and no decode speed
    metrics = {**schema1, "best_dev_lev_greedy": 2.5, "eval_beam_width": 10.0, "decode_beam_utterances_per_second": 90.0}
    assert verify.scores(metrics) == ["best_dev_lev_greedy", "eval_dev_lev_beam", "eval_dev_per"]


def test_the_summary_takes_the_epoch_with_the_lowest_greedy_distance():
    rows = [EpochRow(1, 3.0, 60.0, 9.0, 0.5, 1e-3), EpochRow(2, 2.0, 50.0, 4.0, 0.2, 5e-4),
            EpochRow(3, 1.0, 55.0, 4.5, 0.25, 1e-4)]
    s = TrainSummary.of(rows, 1234, {"train": 1, "dev": 0})
    assert (s.best_epoch, s.dev_lev_greedy, s.dev_per, s.dev_loss, s.final_train_loss, s.epochs) == (2, 4.0, 0.2, 50.0, 1.0, 3)
    assert s.tracked({"train_seconds": 12.5, "train_cpu_share": 0.97}) == {"best_dev_lev_greedy": 4.0, "best_epoch": 2, "train_seconds": 12.5,
                                     "train_cpu_share": 0.97}


def test_an_epoch_that_waits_gets_a_small_cpu_share_and_one_that_computes_a_large_one():
    def busy(clock: EpochClock) -> dict:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            sum(range(1000))
        return clock.timing(seen=10, train_seconds=0.25)

    waiting = EpochClock(threads=1)
    time.sleep(0.3)
    idle = waiting.timing(seen=10, train_seconds=0.25)
    assert set(idle) == set(TIMING) and idle["utterances_per_second"] == 40.0 and idle["host_load_1m"] >= 0
    one, two = busy(EpochClock(threads=1))["cpu_share"], busy(EpochClock(threads=2))["cpu_share"]
    # a single busy Python thread fills one thread's share, half of two threads'
    assert idle["cpu_share"] < 0.2 < 0.4 < one <= 1.05 and 0.2 < two <= 0.55
