"""``tokenrelay models``: the models tokenrelay can reach, and which one is the default."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from .. import _portal
from ..config import LOCAL_MODEL, Settings, choose_model, config_dir, resolve, save_default_model
from ..errors import TokenrelayError, UsageError
from ._errors import message
from ._render import Terminal

__all__ = ["ModelRow", "local_model_status", "models"]

_LIST_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    provider: str
    available: bool
    detail: str
    default: bool = False


def _find_module(name: str) -> Path | None:
    # find_spec locates a top-level package without importing it (llama_cpp loads a
    # shared library on import; a listing should not pay for that).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


def local_model_status(settings: Settings) -> tuple[bool, str]:
    """Whether the embedded model can run here, and why not."""
    if _find_module("llama_cpp") is None:
        return False, "llama-cpp-python missing: pip install 'tokenrelay[local]'"
    if settings.gguf_path:
        path = Path(settings.gguf_path)
        if not path.is_file():
            return False, f"TOKENRELAY_GGUF points to a missing file: {path}"
        return True, f"llama.cpp, {path}"
    try:
        from ..providers.local import embedded_model_path

        path = embedded_model_path()
    except TokenrelayError as exc:
        return False, exc.message
    except ImportError as exc:  # the local provider itself does not import
        return False, f"the local provider is unavailable: {exc}"
    if not path.is_file():
        return False, f"model file missing: {path}"
    return True, f"llama.cpp, SmolLM2-135M-Instruct ({path.name})"


def _endpoint_rows(settings: Settings, base_url: str | None,
                   api_key: str | None) -> tuple[list[ModelRow], dict[str, object]]:
    url = base_url or settings.openai_base_url or "https://api.openai.com/v1"
    endpoint: dict[str, object] = {"base_url": url, "reachable": False, "error": None}
    try:
        provider, _ = resolve("endpoint", base_url=base_url, api_key=api_key,
                              settings=settings)
        infos = _portal.run(asyncio.wait_for(provider.list_models(), _LIST_TIMEOUT))
    except Exception as exc:  # noqa: BLE001 -- any failure: one line, and list the rest
        endpoint["error"] = message(exc).removeprefix("error: ")
        return [], endpoint
    endpoint["reachable"] = True
    rows = [ModelRow(i.name, i.provider, True, i.description or url) for i in infos]
    return rows, endpoint


def _collect(base_url: str | None, api_key: str | None) -> dict[str, object]:
    settings = Settings.load()
    choice = choose_model(None, settings, base_url, api_key)
    local_ok, local_detail = local_model_status(settings)
    rows = [
        ModelRow(LOCAL_MODEL, "local", local_ok, local_detail),
        ModelRow("mock", "mock", True, "scripted answers for tests and demos (mock:opt=value,...)"),
    ]
    endpoint = None
    remote: list[ModelRow] = []
    if base_url or api_key or settings.remote_configured:
        remote, endpoint = _endpoint_rows(settings, base_url, api_key)
        rows += remote
    default = choice.name
    if default is None:  # the endpoint's first listed model
        default = remote[0].name if remote else None
    names = {r.name for r in rows}
    if default is not None and default not in names:
        rows.append(ModelRow(default, "openai" if endpoint else "?", False,
                             "the default, not listed by the endpoint"))
    rows = [ModelRow(r.name, r.provider, r.available, r.detail, r.name == default)
            for r in rows]
    return {"default": default, "default_source": choice.source,
            "models": [asdict(r) for r in rows], "endpoint": endpoint}


_SOURCE_WORDS = {
    "TOKENRELAY_MODEL": "from TOKENRELAY_MODEL",
    "models default": "set with `tokenrelay models default`",
    "endpoint": "the endpoint's first listed model",
    "embedded": "the embedded model: nothing else is configured",
}


def _table(data: dict[str, object]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("model", "provider", "", "status"):
        table.add_column(name)
    for row in data["models"]:  # type: ignore[attr-defined]
        status = Text("available" if row["available"] else "unavailable",
                      style="green" if row["available"] else "red")
        status.append(f"  {row['detail']}", style="dim")
        table.add_row(row["name"], row["provider"], "default" if row["default"] else "",
                      status)
    return table


@click.group("models", invoke_without_command=True)
@click.option("--base-url", metavar="URL",
              help="An OpenAI-compatible endpoint (default: $OPENAI_BASE_URL).")
@click.option("--api-key", metavar="KEY", help="API key (default: $OPENAI_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@click.pass_context
def models(ctx: click.Context, base_url: str | None, api_key: str | None,
           as_json: bool) -> None:
    """List the models tokenrelay can reach and which one is the default.

    Always: the embedded local model (smollm2) and mock. With an OpenAI-compatible
    endpoint configured (--base-url, OPENAI_BASE_URL, OPENAI_API_KEY): its models.

    \b
    The default, when no -m is given: TOKENRELAY_MODEL; else the one set with
    `tokenrelay models default NAME`; else, with an endpoint, its first listed
    model; else smollm2.
    """
    if ctx.invoked_subcommand is not None:
        return
    data = _collect(base_url, api_key)
    endpoint = data["endpoint"]
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    term = Terminal.detect()
    term.out_console().print(_table(data))
    if data["default"] is not None:
        term.note(f"default: {data['default']} ({_SOURCE_WORDS[str(data['default_source'])]})",
                  style="dim")
    if isinstance(endpoint, dict) and not endpoint["reachable"]:
        term.note(f"warning: {endpoint['base_url']} unreachable: {endpoint['error']}",
                  style="yellow")


@models.command("default")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Forget the saved default.")
def default(name: str | None, clear: bool) -> None:
    """Show the default model, or save NAME as the default (kept in the config dir).

    \b
    tokenrelay models default              which model, and why
    tokenrelay models default qwen2.5:7b   use it when no -m is given
    tokenrelay models default --clear      back to the automatic choice

    TOKENRELAY_MODEL, when set, still wins over the saved default.
    """
    if clear and name:
        raise UsageError("give NAME or --clear, not both")
    if clear:
        path = save_default_model(None)
        click.echo(f"default model cleared ({path})")
        return
    if name:
        name = name.strip()
        if not name:
            raise UsageError("the model name is empty")
        path = save_default_model(name)
        click.echo(f"default model: {name} (saved in {path})")
        settings = Settings.load()
        if settings.default_model and settings.default_model != name:
            Terminal.detect().note(
                f"warning: TOKENRELAY_MODEL={settings.default_model} is set and wins over it",
                style="yellow")
        return
    choice = choose_model(None, Settings.load())
    shown = choice.name or "the endpoint's first listed model (`tokenrelay models` lists it)"
    click.echo(f"{shown} ({_SOURCE_WORDS[choice.source]})")
    if choice.source != "models default":
        Terminal.detect().note(f"set one with: tokenrelay models default NAME"
                               f" (kept in {config_dir()})", style="dim")
