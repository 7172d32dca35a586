"""The local stack's server definitions: no secret in process arguments, the default corpus made."""

from __future__ import annotations

import stat

from services.stack import servers


def test_the_s3_secret_is_not_in_the_arguments_of_seaweedfs(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    secret = "a-secret-nobody-may-see-in-ps-1234"
    environ = {"IEX_S3_ACCESS_KEY": "someone", "IEX_S3_SECRET_KEY": secret}
    process = servers.s3_process(environ)
    argv = " ".join(process.argv)
    assert secret not in argv
    assert "password" not in argv  # the admin server's own password is not there either
    # The S3 keys are in the identities file only, readable by the owner only.
    identities = tmp_path / "s3" / "identities.json"
    assert secret in identities.read_text()
    assert stat.S_IMODE(identities.stat().st_mode) == 0o600
    # The admin server's password comes from weed's options file: random, private, stable.
    [options_flag] = [a for a in process.argv if a.startswith("-options=")]
    options = tmp_path / "s3" / "weed.options"
    assert options_flag == f"-options={options}"
    content = options.read_text()
    assert content.startswith("admin.password=") and len(content.strip()) > len("admin.password=") + 20
    assert secret not in content
    assert stat.S_IMODE(options.stat().st_mode) == 0o600
    servers.s3_process(environ)
    assert options.read_text() == content


def test_service_start_generates_the_default_corpus_when_stack_env_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("IEX_SEARCH_CORPUS_DIR", raising=False)
    made = []
    from services.search import synthetic

    monkeypatch.setattr(synthetic, "make_corpus", lambda path, per_concept: made.append(path))
    env = servers.stack_env()
    assert env["IEX_SEARCH_CORPUS_DIR"] == str(tmp_path / "corpus" / "synthetic")
    servers.service_process("search", env)
    assert made == [tmp_path / "corpus" / "synthetic"]


def test_a_corpus_of_the_user_is_never_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    made = []
    from services.search import synthetic

    monkeypatch.setattr(synthetic, "make_corpus", lambda path, per_concept: made.append(path))
    mine = tmp_path / "my-photos"
    servers.service_process("search", {**servers.stack_env(), "IEX_SEARCH_CORPUS_DIR": str(mine)})
    assert made == []
