"""How the outside world reads and writes a node: thin aiohttp routes, the Open Inference Protocol,
OpenAPI, metrics, model files, the HTTP server and the client. Routes see a node only through the narrow
interface in ``ports`` (never ``Node``)."""
