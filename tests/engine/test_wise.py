"""WiSE-FT (engine/training/wise.py): fine-tuned encoder layers move toward the pretrained ones, heads stay."""

import pytest

torch = pytest.importorskip("torch")

from engine.training.model import TopModel  # noqa: E402
from engine.training.whisper import pretrained_encoder  # noqa: E402
from engine.training.wise import toward_pretrained  # noqa: E402


def _fine_tuned_run(tmp_path, frozen: int = 2):
    torch.manual_seed(0)
    top = TopModel(pretrained_encoder(), n_intents=4, frozen_layers=frozen)
    with torch.no_grad():  # "fine-tuning": every trained weight moves
        for p in top.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    torch.save({"model": top.state_dict(), "intents": ["a", "b", "c", "<null>"], "epoch": 3, "frozen_layers": frozen},
               run / "best.pt")
    return run, top.state_dict()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_interpolates_encoder_layers_only(tmp_path, beta: float) -> None:
    run, tuned = _fine_tuned_run(tmp_path)
    pre = TopModel(pretrained_encoder(), 4, 2).state_dict()
    meta = toward_pretrained(run, tmp_path / "out", beta)
    ck = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
    assert meta["beta_pretrained"] == beta and ck["frozen_layers"] == 2 and ck["intents"][-1] == "<null>"
    got = ck["model"]
    assert got.keys() == tuned.keys()
    for k, w in got.items():
        if k.startswith("layers."):
            torch.testing.assert_close(w, (1 - beta) * tuned[k] + beta * pre[k])
        else:  # final norm and heads: as trained
            torch.testing.assert_close(w, tuned[k])
    # and it loads as a model of the same shape (calibrate/export read it like any run)
    TopModel(pretrained_encoder(), 4, ck["frozen_layers"]).load_state_dict(got)


def test_rejects_beta_outside_unit_interval(tmp_path) -> None:
    run, _ = _fine_tuned_run(tmp_path)
    with pytest.raises(ValueError, match="beta"):
        toward_pretrained(run, tmp_path / "out", 1.5)


def test_soup_averages_every_weight(tmp_path) -> None:
    from engine.training.wise import soup

    a, wa = _fine_tuned_run(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    torch.manual_seed(1)
    top = TopModel(pretrained_encoder(), n_intents=4, frozen_layers=2)
    torch.save({"model": top.state_dict(), "intents": ["a", "b", "c", "<null>"], "epoch": 1, "frozen_layers": 2},
               b / "best.pt")
    meta = soup([a, b], tmp_path / "out", [0.25, 0.75])
    got = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
    assert meta["weights"] == [0.25, 0.75] and got["frozen_layers"] == 2
    for k, w in got["model"].items():  # heads and norm too, unlike WiSE
        torch.testing.assert_close(w, 0.25 * wa[k] + 0.75 * top.state_dict()[k])
    with pytest.raises(ValueError, match="weights"):
        soup([a, b], tmp_path / "bad", [0.5, 0.6])
    other, _ = _fine_tuned_run(tmp_path / "c", frozen=1)
    with pytest.raises(ValueError, match="does not match"):
        soup([a, other], tmp_path / "bad")
