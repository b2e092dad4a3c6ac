"""The errors a user can cause and fix: the CLI prints them as one clear line, not a traceback."""

from dalle.config import ConfigError
from dalle.data.crawl import CrawlError
from dalle.data.urls import UrlListError
from dalle.schemas import SchemaError
from dalle.storage import StorageError

USER_ERRORS = (ConfigError, UrlListError, CrawlError, StorageError, SchemaError)
