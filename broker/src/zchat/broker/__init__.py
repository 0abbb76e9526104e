"""The zchat broker: a sans-I/O core (``core``) driven by a ZeroMQ I/O loop (``server``)."""

from ._version import __version__
from .config import BrokerConfig
from .core import BrokerCore
from .server import Broker

__all__ = ["Broker", "BrokerConfig", "BrokerCore", "__version__"]
