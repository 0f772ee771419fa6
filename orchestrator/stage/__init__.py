"""``orch stage SRC --hostfile H --to DEST``: a file or folder onto every host, at the speed of one link.

The bytes leave the controller once and travel host to host along the hostfile's ring, in
chunks each host forwards as they arrive (``relay.py``, started on every host over the SSH
connection, plain TCP between hosts, each hop authenticated by a token the controller gave
over SSH). Before a byte moves every host says what it already holds (``ready``), so only what
some host lacks travels, and an interrupted stage continues from the partial files it left.

* ``source.py``: the source's files and their SHA-256 (cached by size, mtime, inode);
* ``plan.py``: the chain: which hosts, in which order, each hop over which address;
* ``relay.py``: the program every host runs (standard library only);
* ``chain.py``: the controller: connects, starts the relays, runs passes, closes the chain
  around a host that vanishes;
* ``unchanged.py``: whether a host already holds everything, asked over SFTP (no relay needed then);
* ``progress.py``: per-host progress bars / plain lines, and the end summary;
* ``command.py``: the command line (cheap to import) and its entry point.
"""
