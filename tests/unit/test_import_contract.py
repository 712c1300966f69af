"""No service imports another service's package: shared code lives in services/common or in
services/llm (the LLM contract), which no service owns. The engine (services/engine, run by
Triton) counts as a service here: infer and trainer reach it only through Triton."""

from __future__ import annotations

import re
from pathlib import Path

SERVICES = ("ingest", "embed", "retrieve", "infer", "monitor", "trainer", "openai_api", "engine")
ROOT = Path(__file__).resolve().parents[2] / "services"
IMPORT = re.compile(r"^\s*(?:from|import)\s+services\.(\w+)", re.MULTILINE)


def test_no_service_imports_another_service():
    crossings = []
    for service in SERVICES:
        for path in (ROOT / service).rglob("*.py"):
            for other in IMPORT.findall(path.read_text(encoding="utf-8")):
                if other in SERVICES and other != service:
                    crossings.append(f"{path.relative_to(ROOT)} imports services.{other}")
    assert crossings == []


CLI_IMPORT = re.compile(r"^\s*(?:from|import)\s+services\.cli(?:\.(\w+)| import (\w+))", re.M)


def test_the_cli_modules_import_no_cycle():
    """main wires the commands; the command modules call the client layer (stubs, documents)
    and never main or each other in a loop."""
    graph = {
        path.stem: {a or b for a, b in CLI_IMPORT.findall(path.read_text(encoding="utf-8"))}
        for path in (ROOT / "cli").glob("*.py")
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert cycles == [], f"CLI modules on an import cycle: {cycles}"
