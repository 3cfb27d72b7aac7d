"""unet.py section 6: the run plumbing imagenet64.py and sdxl.py share."""
import os
import stat

import pytest
import torch

import unet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_check_finite_weights_names_the_module_and_the_last_good_file(tmp_path):
    good, bad = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ckpt = tmp_path / "checkpoint.pt"
    unet.check_finite_weights({"generator": good, "fake_score": bad}, 5, 1, str(ckpt))   # all finite: no error
    with torch.no_grad():
        bad.weight[0, 1] = float("nan")
    with pytest.raises(unet.NonFiniteLoss, match=r"fake_score.*step 7.*none written yet"):
        unet.check_finite_weights({"generator": good, "fake_score": bad}, 7, 1, str(ckpt))
    ckpt.write_bytes(b"x")
    with pytest.raises(unet.NonFiniteLoss, match="checkpoint.pt"):
        unet.check_finite_weights({"fake_score": bad}, 7, 1, str(ckpt))


def test_a_negative_second_moment_gives_nan_weights_that_the_weight_check_catches(tmp_path):
    """The case a finite-loss check misses: finite loss and gradient, corrupted AdamW state, NaN weights."""
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.state[net.weight]["exp_avg_sq"].fill_(-1.0)                  # sqrt of a negative number in the next step
    loss = net(torch.ones(2, 4)).sum()
    unet.check_finite({"loss": loss}, 1, 1, str(tmp_path / "c.pt"))   # the loss is finite ...
    loss.backward()
    opt.step()
    with pytest.raises(unet.NonFiniteLoss, match="non-finite weights"):  # ... the weights are not
        unet.check_finite_weights({"net": net}, 1, 1, str(tmp_path / "c.pt"))


def test_remove_stale_temporaries_only_removes_the_runs_own(tmp_path):
    for name in ["checkpoint.pt.abc123.tmp", "generator.pt.x.tmp", "notes.txt.tmp", "checkpoint.pt", "other.tmp"]:
        (tmp_path / name).write_bytes(b"0")
    removed = unet.remove_stale_temporaries(str(tmp_path), ["checkpoint.pt", "generator.pt"])
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint.pt.abc123.tmp", "generator.pt.x.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "notes.txt.tmp", "other.tmp"]
    assert unet.remove_stale_temporaries(str(tmp_path / "missing"), ["checkpoint.pt"]) == []


def test_open_run_log_keeps_the_lines_a_resumed_run_does_not_redo(tmp_path):
    lines = ["step       2  loss 1\n", "step       4  FID 9.0\n", "note: not a step line\n", "step       6  loss 3\n",
             "step       8  loss"]                                     # the last line, cut off by a kill
    (tmp_path / "log.txt").write_text("".join(lines))
    with unet.open_run_log(str(tmp_path), 4) as log:                  # resumed from the step-4 checkpoint
        log.write("step       5  loss 2\n")
    assert (tmp_path / "log.txt").read_text() == lines[0] + lines[1] + "step       5  loss 2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "log.txt").st_mode) == 0o666 & ~umask    # as open() makes it
    with unet.open_run_log(str(tmp_path), 0):                         # a new run: the old log goes
        pass
    assert (tmp_path / "log.txt").read_text() == ""
    assert os.listdir(tmp_path) == ["log.txt"]                        # no temporary left behind
    (tmp_path / "new").mkdir()
    unet.open_run_log(str(tmp_path / "new"), 0).close()              # no log yet: an empty one
    assert (tmp_path / "new" / "log.txt").read_text() == ""


def test_require_keys_names_the_file_and_what_is_missing():
    with pytest.raises(ValueError, match=r"ck\.pt: not a training checkpoint: missing rng \(it holds: step\)"):
        unet.require_keys({"step": 1}, ["step", "rng"], "ck.pt", "a training checkpoint")
    with pytest.raises(ValueError, match="expected a dict, found list"):
        unet.require_keys([], ["step"], "ck.pt", "a training checkpoint")


def test_save_checkpoint_is_atomic_with_the_usual_file_mode(tmp_path):
    path = tmp_path / "c.pt"
    unet.save_checkpoint({"a": torch.ones(2)}, str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(unet.load_checkpoint(str(path))["a"], torch.ones(2))


def test_batch_generator_is_a_pure_function_of_seed_step_rank():
    a = torch.randn(3, generator=unet.batch_generator(0, 5, 1, "cpu"))
    b = torch.randn(3, generator=unet.batch_generator(0, 5, 1, "cpu"))
    c = torch.randn(3, generator=unet.batch_generator(0, 6, 1, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("argv", [["fid.py", "ref"], ["fid.py", "calc"], ["unet.py"], ["imagenet64.py", "evaluate"],
                                  ["imagenet64.py", "sample"], ["sdxl.py", "eval"], ["sdxl.py", "train"]])
def test_help_shows_defaults_but_none_for_required_or_unset_options(argv, capsys):
    """unet.HelpFormatter: argparse's defaults formatter would print "(default: None)" after a required option and
    an option that is unset unless given."""
    module = __import__(argv[0].removesuffix(".py"))
    with pytest.raises(SystemExit) as exit:
        module.main([*argv[1:], "-h"])
    out = " ".join(capsys.readouterr().out.split())                  # help text wraps at the terminal's width
    assert exit.value.code == 0 and "(default: None)" not in out and "(default: " in out
