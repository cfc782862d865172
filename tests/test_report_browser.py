"""The report as a browser shows it (headless Chromium): a full-page screenshot, no console
messages, one element per completion token, colours that follow the multipliers and, after the
switch, the advantages. CI installs Debian's chromium and sets RLSD_REQUIRE_BROWSER=1, so there
these tests fail rather than skip when the browser is missing."""

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlsd.commands.cli import main
from rlsd.report.browser import find_browser, rendered_dom, run_headless

from .test_cli import argv

if find_browser() is None:
    if os.environ.get("RLSD_REQUIRE_BROWSER") == "1":
        raise RuntimeError("RLSD_REQUIRE_BROWSER=1 but no Chromium: apt-get install chromium")
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)


class Tokens(HTMLParser):
    """Collects, per heat-map block, each token span's data values and computed background."""

    def __init__(self):
        super().__init__()
        self.blocks: list[list[dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "tokens":
            self.blocks.append([])
        if tag == "span" and attrs.get("class") == "tok":
            rgba = re.search(r"rgba?\(([^)]*)\)", attrs["style"]).group(1).split(",")
            self.blocks[-1].append(
                {
                    "m": float(attrs["data-m"]),
                    "a": float(attrs["data-a"]),
                    "rgb": tuple(int(x) for x in rgba[:3]),
                    "alpha": float(rgba[3]) if len(rgba) > 3 else 1.0,
                }
            )


def expected(value: float, centre: float, span: float) -> tuple[tuple[int, int, int], float]:
    strength = max(min((value - centre) / span, 1.0), -1.0)
    return ((22, 163, 74) if strength >= 0 else (220, 38, 38)), abs(strength)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("browser")
    overrides = {
        "model.name": str(tiny_model_dir),
        "model.lora_r": "4",
        "model.threads": "1",
        "data.size": "64",
        "rollout.max_new_tokens": "12",
        "rollout.num_generations": "4",
        "train.prompts_per_step": "2",
        "train.micro_batch_size": "4",
        "train.steps": "3",
        "train.lr": "0.01",
        "reward.verifiers": str(Path(__file__).parent / "rewards_for_tests.py") + ":length_reward",
        "output.dir": str(root),
        "output.run_name": "t",
        "output.progress": "false",
        "output.log_samples": "0",
    }
    assert main(["train", *argv(overrides)]) == 0  # output.report defaults to true
    run_dir = root / "t"
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    return run_dir / "report.html", [s for s in samples if "credit_multiplier" in s]


def test_heat_map_renders_one_coloured_element_per_token(report):
    page, credited = report
    dom, console = rendered_dom(page)
    assert console == []  # no errors, no warnings, nothing logged
    parser = Tokens()
    parser.feed(dom)
    assert parser.blocks
    lengths = {len(s["token_ids"]) for s in credited}
    for block in parser.blocks:
        assert len(block) in lengths
        for token in block:
            rgb, alpha = expected(token["m"], 1.0, 0.5 * 0.2)  # lambda * eps_w
            assert token["alpha"] == pytest.approx(
                alpha, abs=6e-3
            )  # Chromium keeps alpha in 8 bits, prints 2 decimals
            if alpha > 6e-3:
                assert token["rgb"] == rgb
    alphas = {round(t["alpha"], 2) for b in parser.blocks for t in b}
    assert len(alphas) > 1  # the colours actually vary with the weights


def test_switch_recolours_by_advantage(report):
    page, _credited = report
    dom, console = rendered_dom(page, fragment="advantage")
    assert console == []
    parser = Tokens()
    parser.feed(dom)
    picked = [t for b in parser.blocks for t in b]
    biggest = max(abs(t["a"]) for t in picked)
    for token in picked:
        rgb, alpha = expected(token["a"], 0.0, biggest)
        assert token["alpha"] == pytest.approx(
            alpha, abs=6e-3
        )  # Chromium keeps alpha in 8 bits, prints 2 decimals
        if alpha > 6e-3:
            assert token["rgb"] == rgb
    assert '<span id="scale">final advantage A_t: full colour at 0 ±' in dom  # legend follows


def scroll_height(page: Path, tmp_path: Path, width: int = 1280) -> int:
    """The page's scrollHeight once loaded, read from the DOM (not through browser.page_height):
    a copy of the page writes it into an attribute."""
    text = page.read_text()
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load', function () { document.body.setAttribute("
        "'data-height', document.documentElement.scrollHeight); });</script>"
    )
    probe.write_text(text.replace("</body>", script + "</body>"))
    dom, _ = run_headless(probe, "--dump-dom", f"--window-size={width},200")
    return int(re.search(r'data-height="(\d+)"', dom).group(1))


def test_screenshot_is_the_whole_page(report, tmp_path):
    import matplotlib.image

    page, _ = report
    assert main(["report", str(page.parent), "--screenshot"]) == 0
    pixels = matplotlib.image.imread(page.parent / "report.png")
    height = scroll_height(page, tmp_path)
    assert height > 1000  # a real page, taller than the window it was measured in
    assert pixels.shape[1] == 1280 and height <= pixels.shape[0] <= height + 2  # the page, whole
    assert pixels[..., :3].std() > 0.05  # not a blank page
    # the page's end is in the picture: the config block (background #f6f6f6) near the bottom
    grey = (abs(pixels[-200:, :, :3] - 246 / 255) < 2 / 255).all(axis=-1)
    assert grey.any(axis=1).sum() > 50
