"""A candela server as a child process, for the HTTP checks beside this file
(tier_check.py, window_check.py): started on a port with its own data dir and log,
waited for on /health, stopped at the end. Standard library only."""
import os
import random
import shlex
import subprocess
import time
import urllib.error
import urllib.request


def ids(seed, n):
    """`n` fixed token ids drawn from `seed`: ordinary tokens of the SmolLM2 vocabulary
    the synthetic models carry."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


class CandelaServer:
    def __init__(self, name, binary, model, args, port, data_dir, log_path, rust_log):
        self.name, self.port, self.log_path = name, port, log_path
        cmd = [binary, *shlex.split(args), "--model", model, "--port", str(port),
               "--data-dir", data_dir]
        self.cmd = " ".join(cmd)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, RUST_LOG=rust_log))

    def wait(self, limit=300):
        """Seconds until /health answered; raises with the log's last lines if the
        server exits first or does not answer within `limit`."""
        t0 = time.time()
        while time.time() - t0 < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: candela exited ({self.proc.returncode}) "
                                   f"before /health answered; last lines:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return time.time() - t0
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"{self.name}: no /health within {limit} s; last lines:\n{self.tail()}")

    def tail(self, n=20):
        self.log.flush()
        try:
            return "".join(open(self.log_path).readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
