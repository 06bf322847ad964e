"""A report page: for each query, the training sequences that influenced it most, their words
highlighted by how much each carried, with the log's self-influence beside.

One self-contained HTML file (inline CSS and SVG, nothing fetched when it opens), rendered with
Jinja2 with autoescaping on, so training text can never inject markup. It is built from results
already computed: a TopK (or Scores) of the queries, optionally a TokenScores splitting the
listed sequences over their tokens, and a SelfInfluence.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .results import Scores, SelfInfluence, TopK
from .token_split import TokenScores

TEMPLATE = "report.html.j2"


LEVELS = 9  # shades of green (helps) and red (hurts) a token can take


@dataclass
class Token:
    text: str
    value: float | None  # None: no split for this token
    shade: str  # a CSS class: g1..g9 helps, r1..r9 hurts, "" too small to colour


@dataclass
class Entry:
    id: object
    score: float
    share: float
    tokens: list[Token]
    image: str | None = None  # a data: URI, for image data


def report(
    out,
    queries: Sequence,
    scores: TopK | Scores,
    texts: Mapping,
    *,
    tokens: TokenScores | None = None,
    query_tokens: TokenScores | None = None,
    self_influence: SelfInfluence | None = None,
    top: int = 20,
    title: str = "logix report",
) -> Path:
    """Write the page to `out` and return its path.

    queries: one (prompt, completion) pair of strings per query row, in the order of
    scores.query_ids. scores: `log.influence(q, ..., top_k=k)` (a TopK) or the full Scores; each
    query lists its `top` best. texts: {train id: text}, the text a str or a list of token strings
    (tokens are what `tokens` splits: position t of a sequence is its t-th token), or for image
    data an image, a (H, W) or (H, W, 3) array or tensor, shown inline. tokens: a
    TokenScores for the listed sequences (`log.token_influence`), for highlighting. query_tokens: a
    TokenScores over the queries' positions (`log.query_token_influence` for the listed sequences),
    to highlight which prompt and completion tokens the listed sequences explain, summed over them;
    then give each query as token strings, (prompt tokens, completion tokens). self_influence:
    `log.self_influence(...)`, for the distribution and the most self-influential examples.
    A listed score's share is its part of the query's total positive influence over the whole log
    (given Scores), or over the listed sequences (given a TopK).
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive int, got {top!r}")
    ids, values, totals = _listed(scores, top)
    if len(queries) != len(ids):
        raise ConfigError(f"{len(queries)} queries given for {len(ids)} query rows in the scores")
    split, query_split = _split_columns(tokens, "tokens"), _split_columns(query_tokens, "query_tokens")
    sections = []
    for q, ((prompt, completion), row_ids, row_values) in enumerate(zip(_pairs(queries), ids, values)):
        if query_split is not None:  # the query's positions, summed over the listed sequences
            split_values, column = query_split
            parts = split_values[q, [column[i] for i in row_ids.tolist()]].sum(axis=0)
            marked = _tokens(list(prompt) + list(completion), parts)
            prompt, completion = marked[: len(prompt)], marked[len(prompt) :]
        else:
            prompt, completion = _tokens(_joined(prompt), None), _tokens(_joined(completion), None)
        total = totals[q] if totals is not None else float(np.clip(row_values, 0, None).sum())
        entries = []
        for train_id, score in zip(row_ids.tolist(), row_values.tolist()):
            if train_id not in texts:
                raise ConfigError(f"texts has no entry for train id {train_id!r}, listed for query {q}")
            parts = split[0][q, split[1][train_id]] if split is not None and train_id in split[1] else None
            share = score / total if total > 0 else math.nan
            if _is_image(texts[train_id]):
                entries.append(Entry(train_id, score, share, [], _image_uri(texts[train_id])))
            else:
                entries.append(Entry(train_id, score, share, _tokens(texts[train_id], parts)))
        sections.append({"index": q, "prompt": prompt, "completion": completion, "entries": entries})
    env = Environment(loader=PackageLoader("logix", "templates"), autoescape=select_autoescape(default=True))
    page = env.get_template(TEMPLATE).render(
        title=title,
        sections=sections,
        self_plot=_histogram_svg(self_influence) if self_influence is not None else None,
        self_top=_self_top(self_influence, texts) if self_influence is not None else [],
        made=time.strftime("%Y-%m-%d %H:%M"),
        shades=[(level, 0.85 * level / LEVELS) for level in range(1, LEVELS + 1)],
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _pairs(queries) -> list[tuple]:
    """(prompt, completion) per query, each a string or a list of token strings."""
    pairs = []
    for item in queries:
        if isinstance(item, Mapping):
            item = (item.get("prompt", ""), item.get("completion", ""))
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not all(_text_like(s) for s in item):
            raise ConfigError(f"each query must be a (prompt, completion) pair of strings or token lists, got {item!r}")
        pairs.append((item[0], item[1]))
    return pairs


def _text_like(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))


def _joined(value) -> str:
    return value if isinstance(value, str) else "".join(value)


def _listed(scores, top: int):
    """(ids (Q, k), values (Q, k) numpy, each query's total positive influence or None)."""
    if isinstance(scores, TopK):
        if scores.query_ids is None:
            raise ConfigError("scores is a self-influence TopK: give the queries' influence")
        return scores.ids[:, :top], scores.values[:, :top].double().numpy(), None
    if isinstance(scores, Scores):
        best = scores.top_k(min(top, scores.values.shape[1]))
        totals = scores.values.double().clamp_min(0).sum(dim=1).tolist()
        return best.ids, best.values.double().numpy(), totals
    raise ConfigError(f"scores must be a TopK or Scores from log.influence, got {type(scores).__name__}")


def _split_columns(tokens: TokenScores | None, name: str) -> tuple[np.ndarray, dict] | None:
    """(values (Q, n, T) as numpy, {id: its column n}) of a TokenScores, or None."""
    if tokens is None:
        return None
    if not isinstance(tokens, TokenScores):
        raise ConfigError(f"{name} must be a TokenScores, got {type(tokens).__name__}")
    return tokens.values.double().numpy(), {i: n for n, i in enumerate(tokens.ids.tolist())}


def _tokens(text, parts) -> list[Token]:
    """The text as tokens with their shades: green helps the query, red hurts, in LEVELS steps of
    the sequence's largest part."""
    pieces = [text] if isinstance(text, str) else [str(t) for t in text]
    if parts is None or isinstance(text, str):
        return [Token(p, None, "") for p in pieces]
    scale = float(np.abs(parts[: len(pieces)]).max()) if len(pieces) else 0.0
    out = []
    for t, piece in enumerate(pieces):
        value = float(parts[t]) if t < len(parts) else 0.0
        level = round(LEVELS * abs(value) / scale) if scale > 0 else 0
        out.append(Token(piece, value, f"{'g' if value >= 0 else 'r'}{level}" if level else ""))
    return out


def _histogram_svg(self_influence: SelfInfluence) -> str:
    """The self-influence distribution as an inline SVG (matplotlib, log-scaled counts)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    values = self_influence.values.double().numpy()
    figure = Figure(figsize=(6, 2.4))
    axes = figure.add_subplot()
    axes.hist(values[np.isfinite(values)], bins=60, color="#4c72b0", log=True)
    axes.set_xlabel("self-influence")
    axes.set_ylabel("examples")
    figure.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "logix"}):  # the same page from the same results
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prologue: the SVG sits inside the page


def _self_top(self_influence: SelfInfluence, texts: Mapping, count: int = 10) -> list[dict]:
    best = self_influence.top_k(min(count, len(self_influence.ids)))
    rows = []
    for train_id, value in zip(best.ids.tolist(), best.values.tolist()):
        item = texts.get(train_id)
        row = {"id": train_id, "value": value, "text": "(no text given)", "image": None}
        if _is_image(item):
            row["image"] = _image_uri(item)
        elif item is not None:
            row["text"] = _joined(item)
        rows.append(row)
    return rows


def _is_image(value) -> bool:
    """An image: a (H, W) or (H, W, 3 or 4) array or tensor of numbers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return isinstance(value, np.ndarray) and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (3, 4)))


def _image_uri(value) -> str:
    """The image as an inline PNG (a data: URI: part of the page, nothing fetched)."""
    import base64

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import image

    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    buffer = io.BytesIO()
    if array.ndim == 2:
        image.imsave(buffer, array.astype(float), cmap="gray_r", format="png")
    else:
        image.imsave(buffer, np.clip(array.astype(float), 0, 1), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
