"""report.html: one self-contained page per run and validation report; TensorBoard names."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE

from carsynth import report_html, storage
from carsynth.training import TrainConfig, train
from carsynth.validation import ValidationConfig, real_splits, validate_frames, write_report

torch.set_num_threads(1)


class Page(HTMLParser):
    """The images (decoded), headings and text of a page; fails on anything but data URIs."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[bytes] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self._tag = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        attrs = dict(attrs)
        if tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix), "every image is inlined"
            self.images.append(base64.b64decode(attrs["src"][len(prefix) :]))
        assert tag not in ("script", "link"), "nothing external, nothing executable"

    def handle_data(self, data):
        if self._tag in ("h1", "h2"):
            self.headings.append(data)
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    return train(TrainConfig(data=str(FIXTURE), out=str(out), nz=8, ngf=8, ndf=8,
                             batch_size=16, steps=4, log_interval=1, sample_interval=1,
                             checkpoint_interval=2, progress=False, device="cpu"))  # fmt: skip


def test_run_page_embeds_the_curves_and_every_sample_grid(run):
    page = Page((run / "report.html").read_text())
    assert page.headings[0] == "carsynth run run"
    for heading in ("Curves", "Samples over time (EMA generator, fixed noise)", "Settings"):
        assert heading in page.headings
    figures = [run / "loss.png", *sorted((run / "samples").glob("*.png"))]
    assert len(figures) == 5
    assert {f.read_bytes() for f in figures} <= set(page.images)
    assert "batch_size" in page.text and "fingerprint" in page.text


def test_validation_page_embeds_every_figure_and_renders_report_json(tmp_path):
    with storage.open_frame_file(FIXTURE) as f:
        train, train_episodes, holdout, holdout_episodes = real_splits(f)
    config = ValidationConfig(k=10, pca_fit_samples=200, ndb_fit_samples=200, reps=200,
                              reference_frames=500)  # fmt: skip
    result = validate_frames(
        train, train_episodes, holdout, holdout_episodes, np.concatenate([train, train]), config
    )
    report = write_report(result, tmp_path / "report")
    page = Page((report / "report.html").read_text())
    pictures = sorted(report.glob("*.png"))
    assert [p.name for p in pictures] == ["closest_pairs.png", "ndb_bins.png", "nn_distances.png"]
    assert {p.read_bytes() for p in pictures} <= set(page.images)
    assert ("PASS" if result.passed else "FAIL") in page.text
    # Whatever report.json holds is shown (the gate's null quantiles and p-values, say).
    data = json.loads((report / "report.json").read_text())
    data["null"] = {"ndb_quantiles": [0.01, 0.02, 0.05], "p_value": 0.0123}
    (report / "report.json").write_text(json.dumps(data))
    provenance = {"file": "/x/synthetic.h5", "generator_sha256": "ab" * 32}
    page = Page(report_html.write_validation_page(report, provenance).read_text())
    assert {"ndb_quantiles", "p_value", "0.0123", "generator_sha256", "ab" * 32} <= set(page.text)
    assert "Provenance of the exported file" in page.headings


def test_json_html_shortens_long_lists_and_escapes():
    html = report_html.json_html({"<b>": list(range(100)), "passed": True, "resume": False})
    assert "&lt;b&gt;" in html and "... (100 values)" in html
    assert html.count('class="pass"') == 1 and 'class="fail"' not in html


def test_tensorboard_scalars_and_sample_grids_have_the_usual_names(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/d", "loss/g", "D/real", "D/fake", "samples/diversity"} <= scalars
    assert [e.step for e in events.Scalars("loss/g")] == [1, 2, 3, 4]
    assert "samples" in events.Tags()["images"]
    assert np.isfinite([e.value for e in events.Scalars("loss/d")]).all()
