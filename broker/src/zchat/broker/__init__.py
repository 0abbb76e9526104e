"""The zchat broker: a sans-I/O core (``core``) driven by a ZeroMQ I/O loop (``server``)."""

from .config import BrokerConfig
from .core import BrokerCore
from .server import Broker

__version__ = "0.1.0"

__all__ = ["Broker", "BrokerConfig", "BrokerCore", "__version__"]
