"""Print the Markdown table of a chart's values from the ``# --`` comments in its values.yaml.

    python tools/values_table.py helm/kserve-llm/values.yaml

The README's table is this output; a test fails when the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def rows(values_file: Path) -> list[tuple[str, str, str]]:
    lines = values_file.read_text().splitlines()
    values = yaml.safe_load(values_file.read_text())
    out, stack, comment = [], [], ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = stripped[4:].strip()
            continue
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        key = stripped.split(":", 1)[0]
        stack = stack[:indent] + [key]
        if comment:
            node = values
            for part in stack:
                node = node[part]
            default = "`" + yaml.safe_dump(node, default_flow_style=True, width=1000).strip().removesuffix("...").strip() + "`"
            out.append((".".join(stack), default, comment))
            comment = ""
    return out


def table(values_file: Path) -> str:
    lines = ["| value | default | meaning |", "|---|---|---|"]
    escaped = "\\|"  # a pipe inside a Markdown table cell
    lines += [f"| `{key}` | {default.replace('|', escaped)} | {text} |" for key, default, text in rows(values_file)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "helm/kserve-llm/values.yaml")))
