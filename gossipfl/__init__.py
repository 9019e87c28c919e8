"""gossipfl: peer-to-peer, serverless learning by gossip averaging."""

__version__ = "0.1.0"
