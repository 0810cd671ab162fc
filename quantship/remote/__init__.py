"""Running a runner on another machine (the device that ships): the transport (OpenSSH), the self-contained
device runner file, and the host side that copies artifacts, streams batches and collects rows."""
