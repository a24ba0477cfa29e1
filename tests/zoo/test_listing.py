"""The zoo's model table (``attnzoo.zoo.listing``): rows built on the meta device, plain and markdown output."""

from __future__ import annotations

from pathlib import Path

import timm

from attnzoo.zoo.listing import HEADER, format_table, main, model_rows


def test_rows_describe_the_models():
    rows = {r.name: r for r in model_rows("attnzoo_vit_*")}
    assert {"attnzoo_vit_tiny", "attnzoo_vit_small", "attnzoo_vit_tiny_patch4_28"} <= set(rows)
    row = rows["attnzoo_vit_tiny_patch4_28"]
    real = timm.create_model("attnzoo_vit_tiny_patch4_28")
    assert row.params == sum(p.numel() for p in real.parameters())
    assert row.input_size == (1, 28, 28) and row.attention == "softmax"
    assert row.pretrained == tuple(t.split(".", 1)[1] for t in timm.list_pretrained("attnzoo_vit_tiny_patch4_28.*"))
    assert row.cells()[:4] == ("attnzoo_vit_tiny_patch4_28", f"{row.params / 1e6:.1f}", "1x28x28", "softmax")


def test_markdown_and_plain_tables(capsys):
    main(["--markdown", "--pattern", "attnzoo_vit_tiny*"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| " + " | ".join(HEADER) + " |"
    assert lines[1] == "|---|---|---|---|---|"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| attnzoo_vit_tiny", "| attnzoo_vit_tiny_patch4_28"]
    plain = format_table(model_rows("attnzoo_vit_small")).splitlines()
    assert plain[0].split()[:2] == ["model", "params"] and plain[1].startswith("attnzoo_vit_small ")
    assert model_rows("no_such_model*") == []


def test_readme_model_table_is_current():
    """The README's model table is ``python -m attnzoo.zoo.listing --markdown``'s output, kept in step."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    table = format_table(model_rows(), markdown=True).splitlines()
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table, "regenerate: python -m attnzoo.zoo.listing --markdown"
