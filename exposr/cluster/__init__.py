"""Clustering: the signed event bus shared by all nodes.

`envelope` is the sans-I/O codec (sign, verify, replay window); `bus` holds
the core every bus shares and the single-node `LocalBus`; `redisbus` carries
the same messages over Redis pub/sub; `udpbus` over UDP datagrams
(`datagram`: their sans-I/O header), to the peers a `discovery` method gives
(a multicast group, or a Kubernetes headless service).
"""
