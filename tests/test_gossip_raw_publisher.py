"""A hostile gossip peer for tests: a bare py-libp2p gossipsub host that skips every check of ours.

Not a test module (it defines no tests): test_gossip.py runs it as a subprocess, because py-libp2p cannot
be imported next to hivemind in the pytest process. For that reason every py-libp2p import is inside
`main()`, so pytest collecting this file imports nothing but the standard library.

    python tests/test_gossip_raw_publisher.py KEY_FILE PAYLOADS_FILE MADDR

It dials MADDR, subscribes to the topics named in PAYLOADS_FILE, waits until the peer has it in its mesh,
then publishes every (topic, data) pair of PAYLOADS_FILE (a msgpack list of [topic, data]) exactly as
given: libp2p's own message signature is valid (it is this host's key), our envelope inside is whatever
the test built (forged, replayed, stale, foreign-run...). It prints "published" and then waits for stdin
to close before exiting.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(key: Path, payloads_file: Path, target: str) -> None:
    import msgpack
    import trio

    trio.run(_publish, key, msgpack.unpackb(payloads_file.read_bytes()), target)


async def _publish(key: Path, payloads: list[list[object]], target: str) -> None:
    import multiaddr
    import trio
    from intellect.crypto.identity import Identity
    from intellect.node.net.gossip_child import libp2p_key_pair
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service.context import background_trio_service

    listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    host = new_host(key_pair=libp2p_key_pair(Identity.load(key)), listen_addrs=[listen])
    router = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        max_messages_per_topic_per_second=1000,
    )
    pubsub = Pubsub(host, router, strict_signing=True)
    async with host.run([listen]), background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        topics = sorted({topic for topic, _ in payloads})
        for topic in topics:
            await pubsub.subscribe(topic)
        info = info_from_p2p_addr(multiaddr.Multiaddr(target))
        with trio.fail_after(15):
            await host.connect(info)
            for topic in topics:
                while info.peer_id not in router.mesh.get(topic, set()):
                    await trio.sleep(0.1)
        for topic, data in payloads:
            await pubsub.publish(topic, data)
            await trio.sleep(0.05)
        print("published", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
