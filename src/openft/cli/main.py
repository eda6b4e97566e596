"""The ``openft`` command. Heavy imports happen inside commands so ``--help`` stays instant."""

from __future__ import annotations

import typer

from openft.cli import chat, export, files, jobs, keys, migrate, models, serve, validate

app = typer.Typer(
    help="openft: self-hosted fine-tuning with OpenAI's API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve.serve)
app.command("worker")(serve.worker)
app.add_typer(keys.app, name="keys")
validate.register(app)
app.command("export")(export.export)
app.command("models")(models.models)
app.add_typer(files.app, name="files")
app.add_typer(jobs.app, name="jobs")
app.command("chat")(chat.chat)
app.command("migrate")(migrate.migrate)

if __name__ == "__main__":
    app()
