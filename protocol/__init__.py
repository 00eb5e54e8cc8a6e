"""Wire protocol of intellect-node: the msgpack codec, message registry and signed envelope.

Nothing here imports hivemind or torch: the gossip child process (py-libp2p) imports this package, and
hivemind and py-libp2p cannot live in one process (duplicate protobuf symbol `crypto.pb.KeyType`).
"""
