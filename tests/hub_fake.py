"""A Hub stand-in on 127.0.0.1 with the endpoints huggingface_hub calls for `create_repo` and
`upload_folder` of small files: repos/create, validate-yaml, preupload (every file "regular") and the
NDJSON commit, whose base64 file contents it keeps. `fail` maps a path fragment to a status to answer."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field

from http_recorder import Recorder, Request


@dataclass
class FakeHub:
    repos: dict[str, dict] = field(default_factory=dict)  # id -> {"private": ..., "files": {path: bytes}}
    fail: dict[str, int] = field(default_factory=dict)
    commits: list[list[str]] = field(default_factory=list)  # the paths of each commit

    def __post_init__(self) -> None:
        self.recorder = Recorder(self._answer)
        self.url = self.recorder.url

    @property
    def requests(self) -> list[Request]:
        return self.recorder.requests

    def close(self) -> None:
        self.recorder.close()

    def _answer(self, request: Request) -> tuple[int, str, bytes]:
        for fragment, status in self.fail.items():
            if fragment in request.path:
                return status, "application/json", json.dumps({"error": "fake failure"}).encode()
        path = request.path.split("?")[0]
        if path == "/api/repos/create":
            body = json.loads(request.body)
            repo_id = f"{body['organization']}/{body['name']}"
            self.repos.setdefault(repo_id, {"private": body.get("visibility") == "private", "files": {}})
            return _json({"url": f"{self.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return _json({})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(\w+)", path)
        if match is None or match.group(1) not in self.repos:
            return 404, "application/json", json.dumps({"error": "Repository not found"}).encode()
        repo = self.repos[match.group(1)]
        if match.group(2) == "preupload":
            files = json.loads(request.body)["files"]
            return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                    for f in files]})
        paths = []
        for line in request.body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                paths.append(item["value"]["path"])
        self.commits.append(paths)
        return _json({"commitUrl": f"{self.url}/{match.group(1)}/commit/{'a' * 40}", "commitOid": "a" * 40})


def _json(value: object) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(value).encode()
