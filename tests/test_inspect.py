"""diffopt.inspect, its report and HTML page, and the `diffopt inspect` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import diffopt
from diffopt.backend import capture
from diffopt.cli import main
from diffopt.evaluation import zoo
from diffopt.runtime import RegionExecutor

from .models import UserDenoiser, timestep_embedding, user_model


@pytest.fixture(scope="module")
def dit_report():
    model, inputs = zoo.build("tiny-dit")
    return diffopt.inspect(model, inputs, {"inner": "eager"})


def test_report_lists_regions_with_nodes_params_and_flops(dit_report):
    names = [r.name for r in dit_report.regions]
    assert names == ["prologue", "transformer_blocks.0", "transformer_blocks.1", "epilogue"]
    block = dit_report.regions[1]
    assert block.nodes > 10
    model, _ = zoo.build("tiny-dit")
    own = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    assert block.params == own
    # every token goes through the block's attention and MLP weights: 2 FLOPs per weight
    tokens = 2 * (model.config.sample_size // model.config.patch_size) ** 2
    per_token = [model.transformer_blocks[0].attn1, model.transformer_blocks[0].ff]
    weights = sum(p.numel() for m in per_token for p in m.parameters() if p.dim() == 2)
    assert block.flops >= 2 * tokens * weights
    assert dit_report.regions[2].flops == block.flops


def test_report_text_shows_regions_passes_and_code(dit_report):
    text = str(dit_report)
    for expected in (
        "prologue",
        "transformer_blocks.1",
        "epilogue",
        "pass regions",
        "pass remove_noops",
        "timestep input",
        "before passes",
        "after passes",
        "def forward",
    ):
        assert expected in text


def test_cleanup_pass_rewrites_are_visible(dit_report):
    cleanup = next(p for p in dit_report.passes if p.name == "remove_noops")
    assert cleanup.rewritten, "eval-mode dropout is in every diffusers block"
    dropout = next(e for e in cleanup.rewritten if e.what.endswith("dropout"))
    region = dropout.where.split(" / ")[0]
    assert "dropout" in dit_report.code_before[region]
    assert dit_report.code_after[region].count("dropout") < dit_report.code_before[region].count(
        "dropout"
    )


def test_save_html_is_one_self_contained_page(dit_report, tmp_path):
    page = dit_report.save_html(tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "<script src" not in page and "<link" not in page
    assert page.count('<table class="diff"') == len(dit_report.regions)
    assert "transformer_blocks.0" in page


def test_positional_inputs_are_accepted():
    model, inputs = user_model()
    report = diffopt.inspect(model, inputs)
    assert len(report.blocks) == 3


class _BranchesOnData(torch.nn.Module):
    """HunyuanVideo 1.5's shape: the prologue branches on a tensor's value (a graph break), the
    blocks run in the graph after it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = user_model()

    def forward(self, x: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if torch.all(image == 0):  # data-dependent: dynamo breaks the graph here
            x = x * 0.5
        return self.inner(x, t)["sample"]


def test_inspect_runs_across_a_graph_break(tmp_path):
    model = _BranchesOnData().eval()
    x, t = user_model()[1]
    report = diffopt.inspect(model, (x, t, torch.zeros(2, 3)))
    assert report.graphs == 2
    assert [b.name for b in report.blocks] == [f"inner.blocks.{i}" for i in range(3)]
    assert "compiles to 2 graphs" in str(report)


@pytest.mark.parametrize("image", [torch.zeros(2, 3), torch.ones(2, 3)], ids=["zero", "set"])
def test_export_takes_a_branch_on_data_as_the_example_does_and_the_engine_checks_it(
    tmp_path, image
):
    model = _BranchesOnData().eval()
    x, t = user_model()[1]
    diffopt.export(model, (x, t, image), out=tmp_path / "engine")
    # the recording of reads is undone: torch.Tensor inherits them from C again
    assert not {"__bool__", "tolist", "item"} & set(vars(torch.Tensor))
    engine = diffopt.load_engine(tmp_path / "engine")
    with torch.no_grad():
        expected = model(x, t, image)
    torch.testing.assert_close(engine(x=x, t=t, image=image), expected, atol=1e-5, rtol=1e-5)
    other = 1 - image  # the other way at the branch: this engine holds only one
    line = r"`if torch\.all\(image == 0\):` being " + str(bool(image.eq(0).all()))
    with pytest.raises(ValueError, match=line + r".*go another way"):
        engine(x=x, t=t, image=other)


class _ReadsItsGridFromATensor(torch.nn.Module):
    """Wan-Animate 2's shape: the token grid comes as a tensor read with ``tolist()`` into the
    key of a cache of tables, and the model stores the table on itself (dynamo returns it
    beside the output, for its glue code to store)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = user_model()
        self.tables: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        key = tuple(grid.tolist())
        if key not in self.tables:
            self.tables[key] = torch.arange(key[0] * key[1], dtype=x.dtype).view(1, *key)
        self.table = self.tables[key] * 2
        return self.inner(x + self.table.mean(-1, keepdim=True), t)["sample"]


def test_export_reads_a_tensor_into_python_as_the_example_does_and_the_engine_checks_it(tmp_path):
    model = _ReadsItsGridFromATensor().eval()
    x, t = user_model()[1]
    grid = torch.tensor([10, 3])
    diffopt.export(model, (x, t, grid), out=tmp_path / "engine")
    engine = diffopt.load_engine(tmp_path / "engine")
    with torch.no_grad():
        expected = model(x, t, grid)
    # the engine returns the model's output alone, not the table the model stored on itself
    torch.testing.assert_close(engine(x=x, t=t, grid=grid), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`key = tuple\(grid\.tolist\(\)\)` reading \[10, 3\]"):
        engine(x=x, t=t, grid=torch.tensor([10, 5]))


class _SizeFromData(torch.nn.Module):
    """Lumina2's and HiDream's shape: a size taken from data (one graph would need a guard on
    it: dynamo's UserError under fullgraph), the blocks after it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = user_model()

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = mask.nonzero()[:, 0]  # as many rows as the mask holds: known only at run time
        if kept.shape[0] > 1:
            x = x * 1.0
        return self.inner(x, t)["sample"]


def test_inspect_runs_across_a_size_taken_from_data_and_export_names_it(tmp_path):
    model = _SizeFromData().eval()
    x, t = user_model()[1]
    report = diffopt.inspect(model, (x, t, torch.ones(3)))
    assert [b.name for b in report.blocks] == [f"inner.blocks.{i}" for i in range(3)]
    # the message names the model's own line first, then dynamo's full message
    line = r"at `if kept.shape\[0\] > 1:` \(.*test_inspect.py:\d+\)\..*torch\._check"
    with pytest.raises(ValueError, match=r"size taken from data " + line):
        diffopt.export(model, (x, t, torch.ones(3)), out=tmp_path / "engine")


class _PoolsValidTokensInALoop(UserDenoiser):
    """HunyuanVideo 1.5's shape: a branch on data, then boolean-mask indexing in a loop over the
    batch (its valid text tokens moved first), then the blocks, all in one forward."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if torch.all(mask):  # data-dependent: dynamo breaks the graph here
            x = x * 1.0
        h = self.embed(x)
        valid = []
        for row, keep in zip(h, mask, strict=True):  # a for loop: a break here skips the frame
            valid.append(row[keep].sum(0))
        temb = self.time(timestep_embedding(t, self.dim)) + torch.stack(valid)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h)


def test_blocks_after_a_size_taken_from_data_in_a_loop_stay_one_stack():
    # dynamo breaks at a mask's nonzero inside a loop by skipping the whole frame, compiling
    # each block on its own; capture keeps the nonzero in the graph as an unbacked size, and a
    # second capture of the model does so again (dynamo keeps the first one's skip mark)
    torch.manual_seed(0)
    model = _PoolsValidTokensInALoop(depth=2).eval()
    inputs = (torch.randn(2, 10, 4), torch.tensor([700.0, 3.0]), torch.rand(2, 10) > 0.5)
    report = diffopt.inspect(model, inputs, {"inner": "eager"})
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    captured = capture(model, inputs, diffopt.Config(inner="eager"), one_graph=False)
    with torch.no_grad():
        got = RegionExecutor(captured.result.program)(*captured.inputs)
        torch.testing.assert_close(got, (model(*inputs),))


def test_cli_inspect_builtin(capsys, tmp_path):
    assert (
        main(["inspect", "tiny-pixart", "--inner", "eager", "--html", str(tmp_path / "p.html")])
        == 0
    )
    out = capsys.readouterr().out
    assert "transformer_blocks.1" in out and "MFLOPs" in out
    assert (tmp_path / "p.html").exists()


def test_cli_inspect_local_diffusers_folder(capsys, tmp_path):
    model, _ = zoo.build("tiny-sd3")
    model.save_pretrained(tmp_path / "sd3")
    assert main(["inspect", str(tmp_path / "sd3")]) == 0
    assert "transformer_blocks.1" in capsys.readouterr().out


def test_cli_inspect_factory_and_strict_in_a_subprocess():
    command = [sys.executable, "-m", "diffopt.cli", "inspect", "tests.models:user_model"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "blocks.2" in out

    command[-1] = "tests.models:NoBlocks"  # not a factory of (model, inputs)
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2 and "error" in failed.stderr


def test_cli_rejects_unknown_model(capsys):
    assert main(["inspect", "tiny-nope"]) == 2
    assert "not a built-in model" in capsys.readouterr().err


def test_cli_without_the_eval_extra_says_which_extra(capsys, monkeypatch):
    # the verbs resolve models through the evaluation kit, whose import names the missing extra
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "diffopt.evaluation", raising=False)  # again, no sklearn
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sklearn" else find_spec(name, *a),
    )
    assert main(["inspect", "tiny-dit"]) == 2
    err = capsys.readouterr().err
    assert "diffopt inspect: error" in err and "'eval' extra" in err and "sklearn" in err


def test_the_model_line_is_the_deepest_frame_that_is_neither_torch_nor_diffopt():
    from diffopt.backend import model_line

    stack = (
        '  File "/x/diffopt/backend.py", line 141, in call\n    return model(*args)\n'
        '  File "/y/site-packages/diffusers/models/m.py", line 7, in forward\n    h = f(x)\n'
        '  File "/y/site-packages/diffusers/models/m.py", line 3, in <lambda>\n'
        "    f = lambda x: x[x > 0]\n"
        '  File "/y/site-packages/torch/_dynamo/polyfills/__init__.py", line 9, in g\n    pass\n'
    )
    assert model_line(stack) == ("f = lambda x: x[x > 0]", "diffusers/models/m.py:3")
    assert model_line("no stack here") is None


def test_a_value_read_from_an_input_refuses_a_dynamic_batch_saying_why(tmp_path):
    """Checking the value it read fixes the input's size, so the batch cannot vary (here the
    grid's length happens to equal the batch, as Wan-Animate 2's [B, 3] grid sizes do)."""
    from diffopt.exporters import ExportError

    model = _ReadsItsGridFromATensor().eval()
    x, t = user_model()[1]
    with pytest.raises(ExportError, match=r"reading \[10, 3\].*dynamic_batch=False"):
        diffopt.export(model, (x, t, torch.tensor([10, 3])), out=tmp_path, dynamic_batch=True)
