"""A prefect.yaml build step of t2v's own: Prefect runs it on every `prefect deploy` of the project's file.

Steps are plain functions that prefect.yaml names by their import path, with their keyword arguments
(Prefect's `run_shell_script` and `set_working_directory` are ones too).
"""

from __future__ import annotations


def set_concurrency_limit(name: str, slots: int) -> dict[str, int | str]:
    """Create the global concurrency limit `name` with `slots` slots, or set an existing one's to `slots`.

    A prefect.yaml has no section for global concurrency limits; Prefect's documented ways to make one are
    the UI, `prefect gcl create`, Terraform and the client, which this step uses.
    """
    from prefect.client.orchestration import get_client

    slots = int(slots)  # templated values may arrive as text
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)
    return {"name": name, "slots": slots}
