"""A fake coding-agent CLI for tests/test_agent.py (prints Claude Code's JSON result shape).

usage: fake_agent.py PROMPT_FILE TARGET OLD NEW [EXTRA]
EXTRA: "extra" also writes notes.txt; a path: also tries to write that path (an escape attempt).
"""

import json
import os
import pathlib
import sys

prompt = pathlib.Path(sys.argv[1]).read_text()
assert "Research program" in prompt and "score" in prompt, prompt[:200]
target, old, new = sys.argv[2], sys.argv[3], sys.argv[4]
p = pathlib.Path(target)
p.write_text(p.read_text().replace(old, new))
if len(sys.argv) > 5:
    extra = sys.argv[5]
    if extra == "extra":
        pathlib.Path("notes.txt").write_text("scratch\n")
    else:
        try:
            pathlib.Path(extra).write_text("escaped\n")
        except OSError as e:
            print(f"refused: {e}")
print("working... key=" + os.environ.get("NIGHTLAB_TEST_KEY", ""))
print(json.dumps({"type": "result", "result": "I moved X " + new, "total_cost_usd": 0.0125,
                  "usage": {"input_tokens": 900, "output_tokens": 120, "cache_read_input_tokens": 100}}))
