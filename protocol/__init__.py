"""Wire protocol of intellect-node: the msgpack codec, message registry and signed envelope.

Nothing here imports hivemind or torch: these are pure rules and formats, checked and tested without a
p2p daemon or a GPU stack.
"""
