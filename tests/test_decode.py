"""Greedy and beam decoding."""
import pytest
import torch
import torch.nn.functional as F

from ctclab.decode import BeamDecoder, greedy
from ctclab.metrics import score


def peaked(paths, T, C=41, peak=0.98):
    lp = torch.full((len(paths), T, C), (1 - peak) / (C - 1))
    for b, path in enumerate(paths):
        for t, c in enumerate(path):
            lp[b, t, c] = peak
    return lp.log()


def test_greedy_collapses_repeats_and_drops_blanks_within_length():
    paths = [[0, 5, 5, 0, 5, 7, 7, 0], [9, 9, 0, 0, 3, 0, 0, 0]]
    lp = peaked(paths, 8)
    assert greedy(lp, torch.tensor([8, 5])) == [[5, 5, 7], [9, 3]]
    assert greedy(lp, torch.tensor([3, 1])) == [[5], [9]]


@pytest.mark.parametrize("beam_width", [1, 5, 25])
def test_greedy_and_beam_agree_on_peaked_posteriors(beam_width):
    paths = [[0, 5, 5, 0, 5, 7, 7, 0, 1], [9, 9, 0, 0, 3, 40, 40, 0, 2]]
    lp, lengths = peaked(paths, 9), torch.tensor([9, 9])
    with BeamDecoder(beam_width) as beam:
        assert beam.decode(lp, lengths) == greedy(lp, lengths) == [[5, 5, 7, 1], [9, 3, 40, 2]]


def sequence_log_prob(log_probs, hyp):
    if not hyp:
        return log_probs[:, 0].sum().item()
    loss = F.ctc_loss(log_probs[:, None, :], torch.tensor([hyp]), torch.tensor([len(log_probs)]),
                      torch.tensor([len(hyp)]), blank=0, reduction="sum")
    return -loss.item()


def test_beam_never_scores_below_greedy_on_random_posteriors():
    g = torch.Generator().manual_seed(0)
    wins = 0
    for trial in range(30):
        T = 12
        logits = torch.randn(1, T, 41, generator=g) * 2
        logits[..., 0] += 1.5  # blank-heavy, as CTC outputs are
        lp = logits.log_softmax(-1)
        lengths = torch.tensor([T])
        with BeamDecoder(25) as beam:
            b = beam.decode(lp, lengths)[0]
        gr = greedy(lp, lengths)[0]
        lb, lg = sequence_log_prob(lp[0], b), sequence_log_prob(lp[0], gr)
        assert lb >= lg - 1e-4, (trial, b, gr, lb, lg)
        wins += lb > lg + 1e-4
    assert wins > 0  # the beam does find better labellings than the best path


def test_beam_workers_give_the_same_output():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(6, 30, 41, generator=g).log_softmax(-1)
    lengths = torch.tensor([30, 25, 20, 15, 10, 1])
    with BeamDecoder(10, workers=1) as one, BeamDecoder(10, workers=2) as two:
        assert one.decode(lp, lengths) == two.decode(lp, lengths)
