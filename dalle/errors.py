"""The errors a user can cause and fix: the CLI prints them as one clear line, not a traceback."""

from dalle.config import ConfigError
from dalle.data.crawl import CrawlError
from dalle.data.text_tokenizer import TokenizerError
from dalle.data.tokenize import ShardsMismatch
from dalle.data.urls import UrlListError
from dalle.schemas import SchemaError
from dalle.storage import StorageError
from dalle.train.checkpoint import CheckpointMismatch
from dalle.train.loop import TrainingDiverged

USER_ERRORS = (
    ConfigError,
    UrlListError,
    CrawlError,
    StorageError,
    SchemaError,
    TokenizerError,
    ShardsMismatch,
    CheckpointMismatch,
    TrainingDiverged,
    FileNotFoundError,  # a stage run before the one it needs: the message names the command to run first
)
