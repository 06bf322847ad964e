"""The report page (logix.report): what it shows, that training text cannot inject markup, that it
needs nothing from the network, and that a real browser renders it without a console error."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_token_split import VOCAB, gpt2, sequence_losses, sequences

import logix

CHROMEDRIVER = "/usr/bin/chromedriver"
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A fixed-checkpoint log of 24 sequences, 3 queries, and the page for their top 5."""
    model = gpt2()
    ids, mask = sequences(24, seed=1)
    tmp = tmp_path_factory.mktemp("report")
    with logix.init(tmp / "log", rank=4, statistics="ekfac") as run:
        run.watch(model)
        for start in range(0, 24, 8):
            rows = slice(start, start + 8)
            with run.capture(list(range(start, start + 8)), mask=mask[rows], reduction="sum"):
                sequence_losses(model, (ids[rows], mask[rows])).sum().backward()
            model.zero_grad(set_to_none=True)
    log = logix.open(tmp / "log")
    q_ids, q_mask = sequences(3, seed=2)
    with log.query(model) as q:
        with q.capture([0, 1, 2], mask=q_mask, reduction="sum"):
            sequence_losses(model, (q_ids, q_mask)).sum().backward()
    top = log.influence(q, "ekfac", top_k=5)
    listed = sorted(set(top.ids.reshape(-1).tolist()))
    tokens = log.token_influence(q, model, listed, (ids[listed], mask[listed]), sequence_losses, preconditioner="ekfac")
    words = [f"w{i}" for i in range(VOCAB)]
    texts = {i: [words[t] + " " for t in ids[i][mask[i].bool()].tolist()] for i in range(24)}
    texts[listed[0]][0] = HOSTILE  # training text is data, never markup
    shown = [[words[t] + " " for t in q_ids[i][q_mask[i].bool()].tolist()] for i in range(3)]
    queries = [(s[:3], s[3:]) for s in shown]  # token strings: the query's positions are highlighted too
    query_tokens = log.query_token_influence(model, (q_ids, q_mask), sequence_losses, listed, preconditioner="ekfac")
    out = logix.report(tmp / "page" / "report.html", queries, top, texts, tokens=tokens, query_tokens=query_tokens,
                       self_influence=log.self_influence("ekfac"), top=5)  # fmt: skip
    return out, top, tokens, texts, queries


def test_every_query_lists_its_top_sequences_with_tokens_and_shares(page):
    out, top, tokens, texts, queries = page
    html = out.read_text()
    for q in range(3):
        section = html.split(f'id="query-{q}"')[1].split("</section>")[0]
        assert section.count('<tr class="entry">') == 5
        # the query's own tokens: what the listed sequences explain, position by position
        query_line = section.split("</p>")[0]
        marks = [float(v) for v in re.findall(r'title="([+-][^"]+)"', query_line)]
        assert len(marks) == len(queries[q][0]) + len(queries[q][1])
        assert sum(marks) == pytest.approx(float(top.values[q].sum()), rel=1e-2)  # each shown to 3 figures
        for train_id, value in zip(top.ids[q].tolist(), top.values[q].tolist()):
            assert f'<td class="num">{train_id}</td><td class="num">{value:+.4g}</td>' in section
        shares = [float(s) for s in re.findall(r'<td class="num">(-?[\d.]+)%</td>', section)]
        positive = np.clip(top.values[q].double().numpy(), 0, None)
        np.testing.assert_allclose(shares, np.round(100 * top.values[q].double().numpy() / positive.sum(), 1))
        # every listed token carries its split value, the values of a sequence adding to its score
        first = top.ids[q, 0].item()
        n = tokens.ids.tolist().index(first)
        shown = [float(v) for v in re.findall(r'title="([+-][^"]+)"', section.split("</tr>")[1])]
        assert len(shown) == len(texts[first])
        assert sum(shown) == pytest.approx(float(top.values[q, 0]), rel=1e-2)  # each shown to 3 figures
        assert float(tokens.values[q, n].sum()) == pytest.approx(float(top.values[q, 0]), rel=1e-4)
    assert "<svg" in html and 'id="self-influence"' in html


def test_training_text_is_escaped_and_nothing_is_fetched(page):
    html = page[0].read_text()
    assert HOSTILE not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not fetch anything"
    assert "<script" not in html.lower()


def test_bad_arguments_are_refused(page, tmp_path):
    out, top, tokens, texts, queries = page
    with pytest.raises(logix.ConfigError, match="2 queries given for 3 query rows"):
        logix.report(tmp_path / "r.html", queries[:2], top, texts)
    with pytest.raises(logix.ConfigError, match="texts has no entry for train id"):
        logix.report(tmp_path / "r.html", queries, top, {})
    with pytest.raises(logix.ConfigError, match=r"each query must be a \(prompt, completion\) pair"):
        logix.report(tmp_path / "r.html", ["just a prompt"] * 3, top, texts)
    with pytest.raises(logix.ConfigError, match="query_tokens must be a TokenScores"):
        logix.report(tmp_path / "r.html", queries, top, texts, query_tokens=top)


@pytest.mark.skipif(
    not Path(CHROMEDRIVER).exists() or shutil.which("chromium") is None,
    reason="NO BROWSER: Debian's chromium and chromium-driver are not installed (.ci/run installs them as root); "
    "the report page was not opened in a browser",
)
def test_a_real_browser_renders_the_page(page, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page[0].resolve().as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, "section.query")) == 3
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.entry")) == 15
        highlighted = driver.find_elements(By.CSS_SELECTOR, "td.text span[title]")
        assert highlighted and highlighted[0].is_displayed()
        plot = driver.find_element(By.CSS_SELECTOR, "#self-influence svg")
        assert plot.size["width"] > 100 and plot.size["height"] > 50
        assert driver.execute_script("return document.querySelectorAll('script').length") == 0  # escaped, not run
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_the_command_line_writes_the_same_page(page, tmp_path, capsys):
    import json

    from logix.cli import main

    out, top, tokens, texts, queries = page
    log_path = out.parent.parent / "log"
    top.save(tmp_path / "top.h5")
    tokens.save(tmp_path / "tokens.h5")
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"id": i, "tokens": t}) for i, t in texts.items()))
    strings = [("".join(p), "".join(c)) for p, c in queries]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in strings))
    args = [str(log_path), "--scores", str(tmp_path / "top.h5"), "--tokens", str(tmp_path / "tokens.h5"),
            "--texts", str(tmp_path / "texts.jsonl"), "--queries", str(tmp_path / "queries.jsonl"), "--top", "5",
            "-p", "ekfac", "--out", str(tmp_path / "cli.html")]  # fmt: skip
    assert main(["report", *args]) == 0
    cli = (tmp_path / "cli.html").read_text()
    python = logix.report(tmp_path / "py.html", strings, top, texts, tokens=tokens,
                          self_influence=logix.open(log_path).self_influence("ekfac"), top=5).read_text()  # fmt: skip
    strip = lambda html: re.sub(r"Made [^.]*\.", "", html)  # noqa: E731 - the time it was made differs
    assert strip(cli) == strip(python)
    (tmp_path / "texts.jsonl").write_text('{"id": 1, "text": "only one"}\n')
    assert main(["report", *args]) == 2
    assert "texts has no entry for train id" in capsys.readouterr().err
    (tmp_path / "queries.jsonl").write_text("not json\n")
    assert main(["report", *args]) == 2
    assert "queries.jsonl:1: not JSON" in capsys.readouterr().err


def test_image_data_is_shown_inline(tmp_path):
    """Training examples that are images (digits here) appear as inline PNGs: nothing fetched."""
    import base64

    g = torch.Generator().manual_seed(0)
    top = logix.TopK(np.array([[4, 1, 7]]), torch.tensor([[3.0, 2.0, 1.0]]), np.array([0]))
    images = {i: torch.rand(8, 8, generator=g) for i in range(10)}
    self_influence = logix.SelfInfluence(torch.arange(10.0), np.arange(10))
    page = logix.report(tmp_path / "images.html", [("a digit", " read as 3")], top, images,
                        self_influence=self_influence, top=3).read_text()  # fmt: skip
    uris = re.findall(r'<img class="image" src="data:image/png;base64,([^"]+)" alt="train example (\d+)"', page)
    assert [int(i) for _, i in uris[:3]] == [4, 1, 7] and len(uris) == 3 + 10
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data, _ in uris)


def test_the_command_line_scores_a_query_log(page, tmp_path):
    """--query QUERY_LOG instead of stored scores: the page lists the same top sequences."""
    import json

    from logix.cli import main

    out, top, tokens, texts, queries = page
    log_path = out.parent.parent / "log"
    model = gpt2()
    q_ids, q_mask = sequences(3, seed=2)
    with logix.init(tmp_path / "queries", rank=4) as run:  # the same config as the train log: same projections
        run.watch(model)
        with run.capture([0, 1, 2], mask=q_mask, reduction="sum"):
            sequence_losses(model, (q_ids, q_mask)).sum().backward()
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"id": i, "tokens": t}) for i, t in texts.items()))
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps({"prompt": "".join(p), "completion": "".join(c)})
                                                      for p, c in queries))  # fmt: skip
    args = ["--query", str(tmp_path / "queries"), "--texts", str(tmp_path / "texts.jsonl"),
            "--queries", str(tmp_path / "queries.jsonl"), "--top", "5", "-p", "ekfac",
            "--out", str(tmp_path / "q.html")]  # fmt: skip
    assert main(["report", str(log_path), *args]) == 0
    html = (tmp_path / "q.html").read_text()
    for q in range(3):
        section = html.split(f'id="query-{q}"')[1].split("</section>")[0]
        listed = [int(i) for i in re.findall(r'<tr class="entry">\n<td class="num">(\d+)</td>', section)]
        assert listed == top.ids[q].tolist()
