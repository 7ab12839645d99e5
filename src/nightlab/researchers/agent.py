"""The ``agent`` researcher: an external coding agent edits a scratch worktree, git says what changed.

From ``nightlab.toml``::

    [researcher]
    kind = "agent"
    preset = "claude"          # or "codex", "aider"; or instead:
    # command = "my-agent --task-file {prompt_file}"
    model = "claude-sonnet-4-5"  # optional, passed as --model
    timeout_s = 1800

Each ``propose`` creates a detached git worktree of the incumbent at
``.nightlab/worktrees/<tag>-agent-<idx>`` (the session's tag first: a ``--resume`` removes what a
killed harness left), writes the prompt (``program.md``, the spec summary, the history and the last
failure, see :mod:`nightlab.context`) to ``<tag>-agent-<idx>.prompt.md`` beside it, and runs the
command non-interactively with the lab folder of that worktree as its working directory. nightlab
then computes the change itself, from outside, with git and a private
index (``git --git-dir <repo> --work-tree <worktree> add -A; diff --cached``): the agent's
account of what it did is never used, only the files it left. The engine guards and applies
that diff like any other candidate. The transcript (stdout and stderr, secrets redacted) and
the prompt are stored as artifacts; the wall time, and the tokens and cost where the agent
reports them (Claude Code's and Codex's JSON, aider's ``Tokens: … Cost: …`` lines), are the
candidate's usage.

Placeholders in ``command``: ``{prompt_file}`` (path, shell-quoted), ``{prompt}`` (the text,
shell-quoted), ``{files}`` (the editable files, shell-quoted), ``{model_arg}`` (``--model X``
or nothing).

**Permissions.** Under bubblewrap (``sandbox = "auto"`` where installed, or ``"required"``)
the agent gets: the network (it must reach its model API); write access to its worktree and
to its own config paths in ``$HOME`` that exist (below) and ``writable`` extras; the rest of
the file system read-only, the lab's ``.nightlab/`` (ledger, artifacts, other worktrees),
the repository's ``.git`` (its objects hold the committed holdout files; git does not work in the
worktree, the presets do not need it), ``[sandbox] hide`` and ``[holdout] files`` hidden (the
lab's and the worktree's copies); credentials in ``$HOME`` hidden (:data:`HOME_SECRETS`: ``~/.ssh``,
``~/.aws``, ``~/.pgpass``, ``~/.netrc``, cloud and registry logins, shell histories; ``show`` gives one
back, ``hide`` adds more); ``/run`` hidden (the host's sockets: Docker, D-Bus, PostgreSQL, ssh and gpg
agents; the name server file stays); of
nightlab's environment, an allowlist: the runs' (``PATH``, ``HOME``, locale, ``CUDA_*``, ...; see
nightlab.runenv), the network's settings (proxies, CA bundles), ``XDG_*`` folders, and the provider's
variables, its key among them (``ANTHROPIC_*`` and ``CLAUDE_*`` for claude, ``OPENAI_*`` and ``CODEX_*``
for codex, the providers aider knows for aider, all of these for ``command``; the transcript is
redacted); more with ``pass_env = ["AWS_*"]`` (Bedrock, say), set with ``env``. Never the ledger's URL
``$NIGHTLAB_DB`` (a PostgreSQL password), and nothing else: ``DATABASE_URL``, ``GH_PAT``, ``AWS_*``,
``SSH_AUTH_SOCK`` stay behind. The presets add their own tool permissions:

- ``claude``: ``claude -p … --output-format json --permission-mode acceptEdits --allowedTools
  Read,Edit,Write,Glob,Grep``: reads and edits files, no shell, no web; writes ``~/.claude``,
  ``~/.claude.json``.
- ``codex``: ``codex exec --json --sandbox workspace-write --skip-git-repo-check``: Codex's own
  sandbox, writes only the workspace (nested in bwrap, Codex's sandbox may fail to start; then
  use ``command`` with ``--sandbox danger-full-access`` and rely on bwrap); writes ``~/.codex``.
- ``aider``: ``aider --message-file … --yes-always --no-git --no-auto-commits
  --no-suggest-shell-commands`` with the editable files added to the chat: edits those files,
  runs no shell commands; writes ``~/.aider*`` files in ``$HOME`` where they exist.

Not covered: with ``sandbox = "none"`` the agent runs with nightlab's own rights (it could
write anywhere the user can); a change outside the lab folder is never applied (the candidate
is rejected), but it stays on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nightlab import globs, runenv, sandbox
from nightlab.context import ContextOptions, build_prompt, redact, secret_values
from nightlab.ledger import DB_ENV
from nightlab.pricing import Price, cost_usd
from nightlab.types import Candidate, Experiment, Usage
from nightlab.workspace import _GIT_CFG, Workspace

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

PRESETS: dict[str, tuple[str, list[str]]] = {
    "claude": ('claude -p "$(cat {prompt_file})" --output-format json --permission-mode acceptEdits '
               '--allowedTools "Read,Edit,Write,Glob,Grep"{model_arg}', ["~/.claude", "~/.claude.json"]),
    "codex": ('codex exec --json --sandbox workspace-write --skip-git-repo-check{model_arg} '
              '"$(cat {prompt_file})"', ["~/.codex"]),
    "aider": ("aider --message-file {prompt_file} --yes-always --no-git --no-auto-commits --no-dirty-commits "
              "--no-check-update --no-show-release-notes --no-analytics --no-suggest-shell-commands "
              "--no-pretty --no-stream{model_arg} {files}",
              ["~/.aider.chat.history.md", "~/.aider.input.history", "~/.aider"]),
}


# What an agent gets of nightlab's environment, besides the runs' allowlist (nightlab.runenv): the network's
# settings (proxies, CA bundles), config folders, and its provider's variables (its key among them).
# Everything else stays behind (DATABASE_URL, GH_PAT, AWS_*, SSH_AUTH_SOCK, ...): the agent has the network.
AGENT_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
               "all_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
               "NODE_EXTRA_CA_CERTS", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
               "XDG_RUNTIME_DIR", "SHELL", "COLUMNS", "NO_COLOR")
PROVIDER_ENV: dict[str, tuple[str, ...]] = {
    "claude": ("ANTHROPIC_*", "CLAUDE_*", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER", "DISABLE_ERROR_REPORTING",
               "MAX_THINKING_TOKENS"),
    "codex": ("OPENAI_*", "CODEX_*"),
    "aider": ("AIDER_*", "OPENAI_*", "ANTHROPIC_*", "GEMINI_*", "OPENROUTER_*", "DEEPSEEK_*", "MISTRAL_*",
              "GROQ_*", "XAI_*", "COHERE_*", "TOGETHERAI_*", "FIREWORKS_*", "OLLAMA_*"),
}
# a command of the user's own: any of the presets' providers
PROVIDER_ENV["command"] = tuple(dict.fromkeys(p for v in PROVIDER_ENV.values() for p in v))

# Credentials in $HOME the agent never needs and must not read (it has the network): hidden under bubblewrap
# (an empty folder, an empty file) unless `show` names one (`show = ["~/.aws"]` for Bedrock, say).
HOME_SECRETS = ("~/.ssh", "~/.aws", "~/.gnupg", "~/.pgpass", "~/.netrc", "~/.git-credentials",
    "~/.config/git/credentials", "~/.config/gcloud", "~/.azure", "~/.kube", "~/.docker", "~/.config/gh",
    "~/.config/hub", "~/.npmrc", "~/.yarnrc", "~/.pypirc", "~/.config/pip", "~/.vault-token", "~/.password-store",
    "~/.local/share/keyrings", "~/.terraform.d", "~/.config/rclone", "~/.boto", "~/.s3cfg", "~/.kaggle",
    "~/.cache/huggingface/token", "~/.huggingface", "~/.config/nightlab", "~/.mlflow", "~/.databrickscfg", "~/.oci",
    "~/.ibmcloud", "~/.config/doctl", "~/.fly", "~/.wrangler", "~/.cloudflared", "~/.m2/settings.xml",
    "~/.gradle/gradle.properties", "~/.cargo/credentials", "~/.cargo/credentials.toml", "~/.gem/credentials",
    "~/.composer/auth.json", "~/.config/op", "~/.config/sops", "~/.config/age", "~/.mozilla",
    "~/.config/google-chrome", "~/.config/chromium", "~/.bash_history", "~/.zsh_history", "~/.python_history",
    "~/.psql_history", "~/.mysql_history", "~/.lesshst", "~/.viminfo")
# System files that hold secrets readable by their owner: nightlab running as root (a container, CI) keeps uid 0
# in the sandbox, and root owns these (dropped capabilities stop only reading other owners' files).
SYSTEM_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssh", "/etc/ssl/private",
                  "/etc/letsencrypt", "/etc/kubernetes", "/etc/rancher", "/etc/wireguard",
                  "/etc/NetworkManager/system-connections", "/etc/credstore", "/etc/credstore.encrypted",
                  "/etc/sudoers.d")
# What an agent could leave in its own writable config to run code, or steer an agent, outside the sandbox
# later (hooks, MCP servers, custom commands and subagents, standing instructions): under bubblewrap the
# ones that exist are bound read-only, and after every run each is put back as it was (a new one removed).
CONFIG_PROTECTED = ("~/.claude/settings.json", "~/.claude/settings.local.json", "~/.claude/CLAUDE.md",
                    "~/.claude/commands", "~/.claude/agents", "~/.claude/hooks", "~/.claude/plugins",
                    "~/.claude/skills", "~/.claude/output-styles", "~/.codex/config.toml", "~/.codex/AGENTS.md",
                    "~/.codex/AGENTS.override.md", "~/.codex/instructions.md", "~/.codex/prompts",
                    "~/.codex/skills", "~/.aider.conf.yml", "~/.aider.model.settings.yml",
                    "~/.aider.model.metadata.json")
# Claude Code writes its state to ~/.claude.json, so it stays writable; what in it starts commands or grants
# permissions in later sessions (MCP servers, allowed tools, trusted folders), at the top and per project,
# is put back after every run.
CLAUDE_STATE = "~/.claude.json"
CLAUDE_STATE_KEYS = ("mcpServers", "allowedTools", "enabledMcpjsonServers", "disabledMcpjsonServers",
                     "enableAllProjectMcpServers", "hasTrustDialogAccepted", "ignorePatterns", "env", "hooks",
                     "permissions", "apiKeyHelper", "customApiKeyResponses")
_SNAPSHOT_MAX = 32 * 2**20  # bytes of a protected folder kept to put it back; beyond, it is only bound read-only

# Host folders of sockets and runtime state: the Docker and containerd sockets (root on the host), the
# D-Bus buses, PostgreSQL's socket (peer authentication as the user: the ledger), ssh-agent and gpg-agent
# sockets under $XDG_RUNTIME_DIR. A read-only bind does not stop connect() on a socket, so they are hidden.
HOST_RUNTIME = ("/run", "/var/run")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: Literal["claude", "codex", "aider"] | None = None
    command: str | None = Field(None, description="a command template, instead of a preset")
    model: str | None = None
    timeout_s: float = Field(1800.0, gt=0)
    sandbox: Literal["auto", "required", "none"] = "auto"
    writable: list[str] = Field(default_factory=list, description="extra paths it may write (~ ok)")
    hide: list[str] = Field(default_factory=list, description="more host paths to hide from it (~ ok), "
                            "beside HOME_SECRETS, /run and the lab's state")
    show: list[str] = Field(default_factory=list, description="HOME_SECRETS entries it may read after all "
                            "(written as listed, e.g. \"~/.aws\" for Bedrock)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the agent")
    pass_env: list[str] = Field(default_factory=list, description="more of nightlab's environment for the agent: "
                                "names, or prefixes written PREFIX_* (AWS_* for Bedrock)")
    context_tokens: int = Field(12000, ge=500)
    price: Price | None = Field(None, description="prices tokens the agent reports without a cost")

    @model_validator(mode="after")
    def _pass_env(self) -> Options:
        bad = [p for p in self.pass_env if not runenv.PATTERN.fullmatch(p)]
        if bad:
            raise ValueError(f"pass_env: {bad[0]!r} is not a variable name or a PREFIX_* pattern")
        return self

    @model_validator(mode="after")
    def _hide(self) -> Options:
        bad = [p for p in self.hide if not (p.startswith("/") or p == "~" or p.startswith("~/"))]
        if bad:
            raise ValueError(f"hide: {bad[0]!r} is relative; write an absolute path or one under ~ (\"~/work/x\")")
        return self

    @model_validator(mode="after")
    def _show(self) -> Options:
        bad = [p for p in self.show if p not in HOME_SECRETS and p not in SYSTEM_SECRETS]
        if bad:
            raise ValueError(f"show: {bad[0]!r} is not among the paths hidden by default; they are: "
                             + ", ".join((*HOME_SECRETS, *SYSTEM_SECRETS)))
        return self

    @model_validator(mode="after")
    def _one_of(self) -> Options:
        if (self.preset is None) == (self.command is None):
            raise ValueError('set exactly one of preset = "claude" | "codex" | "aider" or command = "..."')
        return self


# --------------------------------------------------------------------------- transcripts


def parse_usage(transcript: str) -> tuple[int, int, int, float | None, str]:
    """(tokens_in, tokens_out, tokens_cached, cost or None, the agent's final message) from a transcript.

    Understands Claude Code's ``--output-format json`` result, Codex's ``exec --json`` events and
    aider's ``Tokens: 1.2k sent, 300 received. Cost: $0.01 message`` lines; zeros otherwise.
    """
    t_in = t_out = t_cached = 0
    cost: float | None = None
    final = ""
    for line in transcript.splitlines():
        try:  # the agent's output is untrusted: a line that does not parse gives no usage, never an error
            s = line.strip()
            if s.startswith("{") and s.endswith("}"):
                try:
                    obj = json.loads(s)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(obj, dict):
                    continue
                if obj.get("type") == "result" or "total_cost_usd" in obj:  # Claude Code
                    u = obj.get("usage") or {}
                    read = int(u.get("cache_read_input_tokens", 0) or 0)
                    write = int(u.get("cache_creation_input_tokens", 0) or 0)
                    t_in += int(u.get("input_tokens", 0) or 0) + read + write
                    t_out += int(u.get("output_tokens", 0) or 0)
                    t_cached += read
                    if obj.get("total_cost_usd") is not None:
                        cost = (cost or 0.0) + float(obj["total_cost_usd"])
                    final = str(obj.get("result") or final)
                elif obj.get("type") == "turn.completed":  # Codex
                    u = obj.get("usage") or {}
                    t_in += int(u.get("input_tokens", 0) or 0)
                    t_cached += int(u.get("cached_input_tokens", 0) or 0)
                    t_out += int(u.get("output_tokens", 0) or 0)
                elif obj.get("type") == "item.completed":
                    item = obj.get("item") or {}
                    if item.get("type") in ("agent_message", "assistant_message") and item.get("text"):
                        final = str(item["text"])
                continue
            m = re.search(r"Tokens: ([\d.]+)(k?) sent(?:, ([\d.]+)(k?) cache \w+)*, ([\d.]+)(k?) received\."
                          r"(?: Cost: \$([\d.]+) message)?", s)
            if m:  # aider
                def num(v: str, k: str) -> int:
                    return int(float(v) * (1000 if k else 1))

                t_in += num(m.group(1), m.group(2))
                t_out += num(m.group(5), m.group(6))
                if m.group(7):
                    cost = (cost or 0.0) + float(m.group(7))
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
            continue
    if cost is not None and not math.isfinite(cost):
        cost = None
    if not final:
        paras = [p.strip() for p in transcript.strip().split("\n\n") if p.strip()]
        final = paras[-1] if paras else ""
    return t_in, t_out, t_cached, cost, final[:4000]


# --------------------------------------------------------------------------- the researcher


class AgentResearcher:
    name = "agent"

    def __init__(self, options: Options, spec: Spec, lab_dir: Path) -> None:
        self.o = options
        self.spec = spec
        self.lab_dir = Path(lab_dir).resolve()
        self.ws = Workspace(self.lab_dir)
        self.mode = sandbox.resolve_mode(options.sandbox)
        if options.preset:
            self.template, home_paths = PRESETS[options.preset]
        else:
            self.template, home_paths = options.command or "", []
        self.extra_writable = [Path(os.path.expanduser(p)) for p in [*home_paths, *options.writable]]
        self.extra_hidden = [Path(os.path.expanduser(p)) for p in
                             [*(h for h in (*HOME_SECRETS, *SYSTEM_SECRETS) if h not in options.show), *options.hide]]
        self.secrets = secret_values({**os.environ, **options.env})

    def environment(self) -> dict[str, str]:
        """nightlab's environment as the agent gets it: an allowlist (the runs', :data:`AGENT_NAMES`, the
        provider's variables, ``pass_env``) plus ``env``; never the ledger's URL (with PostgreSQL it holds
        the password, and the agent has the network), even when ``pass_env`` names it."""
        allow = [*AGENT_NAMES, *PROVIDER_ENV[self.o.preset or "command"], *self.o.pass_env]
        env = runenv.filter_env(os.environ, allow)
        env.pop(DB_ENV, None)
        return {**env, **self.o.env}

    def command(self, prompt_file: Path, prompt: str, files: list[str]) -> str:
        model_arg = f" --model {shlex.quote(self.o.model)}" if self.o.model else ""
        return self.template.format(prompt_file=shlex.quote(str(prompt_file)), prompt=shlex.quote(prompt),
                                    files=" ".join(shlex.quote(f) for f in files), model_arg=model_arg)

    def policy(self, worktree: Path, prompt_file: Path) -> sandbox.SandboxPolicy:
        pats = [*self.spec.sandbox.hide, *self.spec.holdout.files]  # both copies: the lab's and the worktree's
        roots = (self.lab_dir, self.ws.lab_in(worktree))
        hidden = [self.ws.state_dir, *(root / p for root in roots for p in globs.cover(root, pats))]
        # the repository too: holdout files are committed (their clean tree is built from git objects), and
        # `git show HEAD:<holdout file>` from the worktree, or inflating the objects, would read them
        hidden += [self.ws.repo_root / ".git", self.ws.git_dir]
        # credentials in $HOME, and the host's sockets; the name server's file is shown again where
        # /etc/resolv.conf points into /run (systemd-resolved): the agent needs the network
        runtime: list[Path] = []  # once each, none inside another (/var/run is /run; $XDG_RUNTIME_DIR in it)
        for raw in sorted({os.path.realpath(p) for p in (*HOST_RUNTIME, os.environ.get("XDG_RUNTIME_DIR", ""))
                           if p.startswith("/")}):
            if not any(Path(raw).is_relative_to(q) for q in runtime):
                runtime.append(Path(raw))
        hidden += [*self.extra_hidden, *runtime]
        hidden += self._other_labs()
        readonly = [prompt_file, *(p for p in self._protected() if p.exists())]
        resolv = Path(os.path.realpath("/etc/resolv.conf"))
        if resolv != Path("/etc/resolv.conf") and resolv.is_file():
            readonly.append(resolv)
        writable = [worktree, *(p for p in self.extra_writable if p.exists())]
        # host_root: the agent needs its CLI and its config, wherever they are installed
        return sandbox.SandboxPolicy(mode=self.mode, network=True, writable=tuple(writable),
                                     readonly=tuple(readonly), hidden=tuple(hidden), host_root=True)

    def _protected(self) -> list[Path]:
        """The CONFIG_PROTECTED paths inside what the agent may write."""
        roots = [r for p in self.extra_writable if p.exists() for r in (p, Path(os.path.realpath(p)))]
        out = []
        for raw in CONFIG_PROTECTED:
            path = Path(os.path.expanduser(raw))  # where it is, or where a link there points (dotfiles)
            if any(q.is_relative_to(r) for q in (path, Path(os.path.realpath(path))) for r in roots):
                out.append(path)
        return out

    def _snapshot(self) -> dict[Path, Any]:
        """What to put back after the run: each protected path as ``("absent",)``, ``("file", bytes)``,
        ``("link", target, bytes or None)`` or ``("dir", {relative path: bytes})``; and ~/.claude.json's
        CLAUDE_STATE_KEYS with its bytes."""
        snap: dict[Path, Any] = {}
        for path in self._protected():
            if path.is_symlink():
                snap[path] = ("link", os.readlink(path), path.read_bytes() if path.is_file() else None)
            elif path.is_file():
                snap[path] = ("file", path.read_bytes())
            elif path.is_dir():
                files = {f.relative_to(path): f for f in path.rglob("*") if f.is_file() and not f.is_symlink()}
                if sum(f.stat().st_size for f in files.values()) <= _SNAPSHOT_MAX:
                    snap[path] = ("dir", {rel: f.read_bytes() for rel, f in files.items()})
            else:
                snap[path] = ("absent",)
        state = Path(os.path.expanduser(CLAUDE_STATE))
        if any(os.path.realpath(state) == os.path.realpath(p) for p in self.extra_writable):
            snap[state] = ("state", _claude_state(state), state.read_bytes() if state.is_file() else None)
        return snap

    def _put_back(self, snap: dict[Path, Any], sandboxed: bool) -> list[str]:
        """Undo the agent's changes to the protected paths; the paths it had changed. Under bubblewrap the
        ones that existed were read-only to it, so only new ones are removed (an edit the user made
        meanwhile stays)."""
        undone = []
        for path, before in snap.items():
            kind = before[0]
            if kind == "state":
                if _claude_state(path) != before[1] and _restore_claude_state(path, before[1], before[2]):
                    undone.append(f"{CLAUDE_STATE} (MCP servers, permissions)")
                continue
            if sandboxed and kind != "absent":
                continue
            if kind == "absent":
                if not (path.exists() or path.is_symlink()):
                    continue
                _remove(path)
            elif kind == "file":
                if path.is_file() and not path.is_symlink() and path.read_bytes() == before[1]:
                    continue
                _remove(path)
                path.write_bytes(before[1])
            elif kind == "link":
                same = path.is_symlink() and os.readlink(path) == before[1]
                if same and (before[2] is None or (path.is_file() and path.read_bytes() == before[2])):
                    continue
                if not same:
                    _remove(path)
                    os.symlink(before[1], path)
                if before[2] is not None:
                    path.write_bytes(before[2])  # the user's file it points to
            else:  # a folder: its files as they were, nothing more
                if path.is_dir() and not path.is_symlink() and before[1] == {
                        f.relative_to(path): (f.read_bytes() if f.is_file() and not f.is_symlink() else None)
                        for f in path.rglob("*") if f.is_file() or f.is_symlink()}:
                    continue
                _remove(path)
                path.mkdir(parents=True)
                for rel, data in before[1].items():
                    (path / rel).parent.mkdir(parents=True, exist_ok=True)
                    (path / rel).write_bytes(data)
            undone.append(str(path))
        return undone

    def _other_labs(self) -> list[Path]:
        """The lab registry (wherever ``$NIGHTLAB_REGISTRY`` puts it) and every other lab it lists: their
        ledgers, holdout files and candidates are none of this agent's business. A lab that holds this one
        has only its ``.nightlab`` hidden."""
        from nightlab.errors import UsageError
        from nightlab.labs import Registry

        try:
            reg = Registry()
            entries = reg.labs
        except (UsageError, OSError):  # an unreadable registry lists nothing; `nightlab labs` says why
            return []
        out = [reg.path]
        for e in entries:
            other = Path(os.path.realpath(os.path.expanduser(e.path)))
            if other == self.lab_dir:
                continue
            out.append(other / ".nightlab" if self.lab_dir.is_relative_to(other) else other)
        return out

    def change(self, worktree: Path, parent: str) -> tuple[str, list[str]]:
        """(diff relative to the lab folder, repo paths changed outside it), computed from outside."""
        with tempfile.TemporaryDirectory(prefix="nightlab-index-") as tmp:
            env = {**self.ws._env, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            base = ["git", *_GIT_CFG, f"--git-dir={self.ws.git_dir}", f"--work-tree={worktree}"]

            def git(*args: str) -> str:
                p = subprocess.run([*base, *args], cwd=worktree, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    raise RuntimeError(f"git {args[0]} failed: {p.stderr.strip()[:300]}")
                return p.stdout

            git("read-tree", parent)
            git("add", "-A", "--", ".")
            names = [n for n in git("diff", "--cached", "--name-only", "-z", parent).split("\0") if n]
            outside = [n for n in names if self.ws.lab_path(n) is None]
            rel = [f"--relative={self.ws.lab_rel}"] if self.ws.lab_rel else []
            diff = git("diff", "--cached", "--binary", "--no-color", "--no-ext-diff", "--no-renames",
                       *rel, parent)
        return diff, outside

    def propose(self, ctx: Context) -> Candidate:
        t0 = time.monotonic()
        tag = str(ctx.extra.get("session") or "")
        name = f"{tag}-agent-{ctx.idx}" if tag else f"agent-{ctx.idx}"  # the tag: a --resume removes what a kill left
        prompt = build_prompt(ctx, ContextOptions(budget_tokens=self.o.context_tokens, include_files=False,
                                                  agent=True), secrets=self.secrets)
        wt = self.ws.add_worktree(name, ctx.parent)
        prompt_file = self.ws.worktrees_dir / f"{name}.prompt.md"
        log = self.ws.worktrees_dir / f"{name}.log"
        snap = self._snapshot()
        undone: list[str] = []
        try:
            prompt_file.write_text(prompt.user, encoding="utf-8")
            cmd = self.command(prompt_file, prompt.user, sorted(ctx.files))
            env = {**self.environment(), "NIGHTLAB_EXPERIMENT": str(ctx.idx), "PYTHONUNBUFFERED": "1"}
            try:
                res = sandbox.run(cmd, cwd=self.ws.lab_in(wt), env=env, policy=self.policy(wt, prompt_file),
                                  timeout_s=self.o.timeout_s, log_path=log)
            finally:
                undone = self._put_back(snap, self.mode == "bwrap")
            if undone:  # in the transcript the human reads, and in agent.json
                with open(log, "a", encoding="utf-8") as f:
                    f.write("\n[nightlab] the agent changed its own configuration; put back as it was: "
                            + ", ".join(undone) + "\n")
            transcript = redact(sandbox.tail(log, 100000, max_bytes=4_000_000), self.secrets)
            t_in, t_out, t_cached, cost, final = parse_usage(transcript)
            if cost is None:
                cost = cost_usd(self.o.price, t_in, t_out, t_cached)
            diff, outside = ("", []) if res.timed_out else self.change(wt, ctx.parent)
        finally:
            self.ws.remove_worktree(wt)
            for p in (prompt_file, log):
                p.unlink(missing_ok=True)
        usage = Usage(t_in, t_out, t_cached, cost, time.monotonic() - t0)
        meta = {"command": cmd, "exit_code": res.exit_code, "timed_out": res.timed_out,
                "sandbox": res.sandbox, "seconds": round(res.wall_s, 3), "config_put_back": undone}
        artifacts = {"prompt.txt": prompt.text(), "transcript.txt": transcript,
                     "agent.json": json.dumps(meta, indent=2)}
        params: dict[str, Any] = {"exit_code": res.exit_code}
        rationale = final.strip() or f"{self.o.preset or 'agent'} edit"
        error = ""
        files = None
        if res.timed_out:
            error = f"the agent timed out after {self.o.timeout_s:g} s"
        elif outside:
            # claim the escaping paths so that the guard rejects the candidate, nothing is written
            files = {f"../{p}": "" for p in outside}
            diff = ""
        elif not diff.strip():
            error = f"the agent changed nothing (exit code {res.exit_code})"
        return Candidate(parent=ctx.parent, rationale=rationale, files=files, diff=diff or None,
                         params=params, usage=usage, researcher=self.name, artifacts=artifacts, error=error)

    def observe(self, experiment: Experiment) -> None:
        pass

    def close(self) -> None:
        pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _claude_state(state: Path) -> Any:
    """The CLAUDE_STATE_KEYS of Claude Code's state file, the user's and each project's (absent keys left
    out); None when unreadable."""
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    projects = data.get("projects")
    if not isinstance(projects, dict):
        projects = {}

    def keys(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: obj[k] for k in CLAUDE_STATE_KEYS if k in obj}

    return {"": keys(data), **{k: keys(v) for k, v in projects.items() if isinstance(v, dict)}}


def _restore_claude_state(state: Path, before: Any, raw: bytes | None) -> bool:
    """Put the CLAUDE_STATE_KEYS back as ``before``, keeping the rest of the state; a file the agent left
    unreadable gets its old bytes back (or goes, if it did not exist). Atomic. True when done."""
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        if raw is None:
            _remove(state)
            return True
        out = raw
    else:
        def put(obj: dict[str, Any], value: Any) -> None:
            for k in CLAUDE_STATE_KEYS:
                obj.pop(k, None)
            obj.update(value or {})

        before = before or {}
        put(data, before.get(""))
        for name, proj in (data.get("projects") or {}).items():
            if isinstance(proj, dict):
                put(proj, before.get(name))
        out = json.dumps(data, indent=2).encode()
    real = Path(os.path.realpath(state))  # a dotfiles symlink stays a symlink
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=real.name + ".", suffix=".nightlab")
    with os.fdopen(fd, "wb") as f:
        f.write(out)
    os.replace(tmp, real)
    return True


def create(options: Options, spec: Spec, lab_dir: Path) -> AgentResearcher:
    return AgentResearcher(options, spec, lab_dir)
