"""The stage table: every registered stage with its parameters, input and output."""

from __future__ import annotations

from .base import lookup, registered_names


def stage_table_markdown(include_plugins: bool = True) -> str:
    """A markdown table of the registered stages, for the README and ``--list-stages``.

    ``include_plugins=False`` lists only the stages that ship with tritonpipe.
    """
    rows = [
        "| stage | parameters (default, range) | input (`data`) | output (`result`) | GPU | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name in registered_names():
        cls = lookup(name)
        if not include_plugins and not cls.__module__.startswith("tritonpipe."):
            continue
        params = "<br>".join(
            f"`{key}`: {param.describe()}" + (f" — {param.doc}" if param.doc else "") for key, param in cls.params.items()
        ) or "—"
        alias = cls.aliases
        title = f"`{name}`" + (f" (alias {', '.join(f'`{a}`' for a in alias)})" if alias else "")
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        gpu = "yes" if cls.wants_gpu else "—"
        rows.append(f"| {title} | {params} | {cls.input_doc} | {cls.output_doc} | {gpu} | {doc} |")
    return "\n".join(rows)
