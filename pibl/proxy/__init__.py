"""The asyncio shell: listeners, client connections, exchanges, upstream pools."""
