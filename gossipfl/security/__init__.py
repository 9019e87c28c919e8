"""Who is a member: the cluster key (HMAC signatures on every node-to-node request and reply), mutual TLS
(contexts and certificate tooling), read tokens and the allow-list. Knows nothing about models or training;
the serving layer enforces it on requests, the protocol and discovery layers on what they send and read."""
