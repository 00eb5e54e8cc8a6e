"""intellect-node: the daemon, training engine and command line of a peer-to-peer DiLoCo network.

`intellect.node` wires the pure pieces of `intellect.crypto` (identity, signatures) and
`intellect.protocol` (codec, envelope, manifest) to the network (hivemind DHT and all-reduce, gossip)
and to torch (model, inner loop, outer step, checkpoints).
"""

__version__ = "0.1.0"
