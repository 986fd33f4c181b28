"""Content Credentials (C2PA) for rdm's images: a signed manifest inside the PNG that any C2PA reader can check.

The manifest holds the action (c2pa.created by rdm, digital source type trainedAlgorithmicMedia, the model's
name and digest, the sampler settings), rdm's own assertion `org.rdm.generation` (query, seed, settings, the
copy guard's verdict), and every neighbour that conditioned the image as an ingredient (collection, id, score,
weight, and the licence and attribution the collection records), linked from the action. Server paths never enter
it (`public_provenance`).

Signing: the operator's key and certificate chain (PEM, leaf first; `--sign-key/--sign-cert` or
RDM_SIGN_KEY/RDM_SIGN_CERT). Without them rdm signs with a local identity it makes once under
$RDM_HOME/c2pa (a throwaway CA and leaf): the manifest is embedded and tamper-evident, but no one trusts that
certificate, and the output says so. c2pa-python (the C2PA SDK) does the embedding, reading and validation.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RDMError

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ASSERTION = "org.rdm.generation"
PRIVATE_KEYS = ("path", "name_or_path", "source", "local_path", "file")  # never leave the machine


def _c2pa():
    try:
        import c2pa
    except ImportError:  # pragma: no cover - a declared dependency
        raise RDMError("content credentials need c2pa-python: pip install c2pa-python") from None
    return c2pa


# --- Identity ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SigningIdentity:
    """A certificate chain (PEM, leaf first) and its private key (PEM); `local`: rdm's own, trusted by no one."""

    chain_pem: bytes
    key_pem: bytes
    local: bool = False
    anchor_pem: bytes | None = None  # the local CA (to verify rdm's own images on this machine)

    @classmethod
    def load(cls, key: str | os.PathLike, cert: str | os.PathLike) -> "SigningIdentity":
        """The operator's identity from a PEM private key and a PEM certificate chain (leaf first)."""
        texts = []
        for path, what in ((key, "--sign-key"), (cert, "--sign-cert")):
            try:
                texts.append(Path(path).read_bytes())
            except OSError as e:
                raise RDMError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
        key_pem, chain_pem = texts
        if b"PRIVATE KEY-----" not in key_pem:
            raise RDMError(f"--sign-key {key}: not a PEM private key")
        if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
            raise RDMError(f"--sign-cert {cert}: not a PEM certificate chain")
        return cls(chain_pem, key_pem)

    @classmethod
    def resolve(cls, key: str | None = None, cert: str | None = None) -> "SigningIdentity":
        """--sign-key/--sign-cert, else RDM_SIGN_KEY/RDM_SIGN_CERT, else the local identity."""
        key = key or os.environ.get("RDM_SIGN_KEY")
        cert = cert or os.environ.get("RDM_SIGN_CERT")
        if bool(key) != bool(cert):
            raise RDMError("give both a signing key and its certificate (--sign-key and --sign-cert, or "
                           "RDM_SIGN_KEY and RDM_SIGN_CERT)")
        return cls.load(key, cert) if key else local_identity()

    def signer(self):
        c2pa = _c2pa()
        try:
            return c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, self.chain_pem,
                                                             self.key_pem, None))
        except c2pa.C2paError as e:
            raise RDMError(f"the signing key and certificate were refused: {e} (C2PA needs an ES256 key and an "
                           "end-entity certificate with digitalSignature and an EKU such as emailProtection, issued "
                           "by a CA; the chain leaf first)") from None


def make_identity(common_name: str = "rdm local signer", days: int = 3650) -> tuple[bytes, bytes, bytes]:
    """A fresh CA and an end-entity certificate it issues, as C2PA's certificate profile asks:
    (chain PEM leaf first, leaf key PEM, CA certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rdm")])

    def usage(sign: bool, certs: bool):
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=certs, crl_sign=certs,
                             encipher_only=False, decipher_only=False)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))
    ca = (x509.CertificateBuilder().subject_name(name(f"{common_name} CA")).issuer_name(name(f"{common_name} CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(False, True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem, ca.public_bytes(pem)


def local_identity(home: Path | None = None) -> SigningIdentity:
    """rdm's local identity (made once, key readable by the user only): tamper-evident, trusted by no one."""
    from filelock import FileLock

    from ..models.assets import rdm_home

    home = Path(home or rdm_home() / "c2pa")
    files = {n: home / n for n in ("chain.pem", "key.pem", "ca.pem")}
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".lock")):
        if not all(p.is_file() for p in files.values()):
            from ..util.files import atomic_write

            chain, key, ca = make_identity()
            atomic_write(files["key.pem"], key)
            os.chmod(files["key.pem"], 0o600)
            atomic_write(files["chain.pem"], chain)
            atomic_write(files["ca.pem"], ca)
    return SigningIdentity(files["chain.pem"].read_bytes(), files["key.pem"].read_bytes(), local=True,
                           anchor_pem=files["ca.pem"].read_bytes())


# --- The manifest ------------------------------------------------------------------------------------

def public_provenance(provenance: dict) -> dict:
    """The provenance as it may leave the machine: items named by collection and id, no file paths."""
    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items() if k not in PRIVATE_KEYS}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and key != "prompt":
            return _PATH.sub(lambda m: Path(m.group(1)).name, value)
        return value

    return clean(provenance)


# an absolute or home-relative path at the start of a string or after a space, '=', ':', '(' or ',' (so
# "local-dir:/srv/models/clip" -> "local-dir:clip"); a URL's "//" is left alone
_PATH = re.compile(r"(?:^|(?<=[\s=:(\[,]))((?:~|\.{1,2})?/(?!/)[^\s'\",;)\]]+)")


def ingredient(hit: dict, position: int) -> dict:
    """One neighbour as a file-less C2PA ingredient: its collection, id, score, weight, caption, and the licence and
    attribution its collection's rule names (rdm.sampling.conditioning.credit puts them on the hit)."""
    collection = hit.get("database") or "refs"
    item = hit.get("id", hit.get("ref", position))
    meta = {k: hit[k] for k in ("score", "weight", "caption", "licence", "attribution") if hit.get(k) is not None}
    return {"title": f"{collection}/{item}", "format": "image/png", "relationship": "inputTo",
            "instance_id": f"rdm:{collection}:{item}:{position}",
            "description": f"neighbour {position + 1} retrieved from {collection}",
            "metadata": {"org.rdm.neighbour": {"collection": collection, "id": item, **meta}}}


def manifest(provenance: dict, title: str = "rdm.png") -> dict:
    """The C2PA manifest definition of one image's provenance (rdm.sampling.provenance.Provenance.to_dict())."""
    from .. import __version__

    prov = public_provenance(provenance)
    ingredients = [ingredient(h, i) for i, h in enumerate(prov.get("neighbours") or [])]
    model = dict(prov.get("model") or {})
    model["name"] = Path(str((provenance.get("model") or {}).get("name_or_path") or "")).name or None
    agent = {"name": "rdm", "version": __version__}
    settings = {k: v for k, v in (prov.get("scheduler") or {}).items() if k != "config"}
    generation = {k: prov.get(k) for k in ("query", "seed", "size", "k", "where", "control", "edit", "databases",
                                           "warnings", "copy_guard", "versions") if prov.get(k) not in (None, {}, [])}
    generation["settings"] = settings
    return {
        "claim_generator_info": [agent], "title": title, "format": "image/png", "ingredients": ingredients,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED, "softwareAgent": agent,
                "parameters": {"ingredientIds": [i["instance_id"] for i in ingredients],
                               "org.rdm.model": {"fingerprint": model.get("fingerprint"),
                                                 "embedder": model.get("embedder"), "name": model.get("name")},
                               "org.rdm.sampler": settings}}]}},
            {"label": ASSERTION, "data": json.loads(json.dumps(generation, default=str))},
        ],
    }


def embed(png: bytes, provenance: dict, identity: SigningIdentity, title: str = "rdm.png") -> bytes:
    """The PNG with its signed manifest embedded (c2pa-python)."""
    c2pa = _c2pa()
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    out = io.BytesIO()
    try:
        c2pa.Builder(manifest(provenance, title), context=context).sign(identity.signer(), "image/png",
                                                                         io.BytesIO(png), out)
    except c2pa.C2paError as e:
        raise RDMError(f"could not embed the content credentials: {e}") from None
    return out.getvalue()


# --- Reading -----------------------------------------------------------------------------------------

@dataclass
class Credentials:
    """What a C2PA reader found in an image."""

    state: str  # "Trusted", "Valid" (signed, image unchanged, certificate not trusted here) or "Invalid"
    status: list[str]  # validation codes that are not successes, e.g. signingCredential.untrusted
    ingredients: list[dict] = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    signer: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def unchanged(self) -> bool:
        """The signature and every hash check out (whether or not the signer is trusted)."""
        return self.state in ("Valid", "Trusted")


def read(path_or_bytes: str | os.PathLike | bytes, trust: bytes | str | None = None) -> Credentials:
    """The manifest of an image, validated by c2pa-python; `trust`: extra trust anchors (PEM) for its signer."""
    c2pa = _c2pa()
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else _read_file(path_or_bytes)
    fmt = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg" if data[:2] == b"\xff\xd8" else None
    if fmt is None:
        raise RDMError("not a PNG or JPEG image")
    settings = {"trust": {"user_anchors": trust.decode() if isinstance(trust, bytes) else trust}} if trust else {}
    try:
        reader = c2pa.Reader(fmt, io.BytesIO(data), context=c2pa.Context.from_dict(settings))
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "not found" in str(e).lower():
            raise RDMError("the image carries no content credentials (no C2PA manifest)") from None
        raise RDMError(f"the image's content credentials cannot be read: {e}") from None
    with reader:
        store = json.loads(reader.json())
        active = reader.get_active_manifest() or {}
        state = reader.get_validation_state() or "Invalid"
    status = [s["code"] for s in store.get("validation_status", []) or []]
    generation = next((a["data"] for a in active.get("assertions", []) if a.get("label") == ASSERTION), {})
    ingredients = [i.get("metadata", {}).get("org.rdm.neighbour", {"title": i.get("title")})
                   for i in active.get("ingredients", [])]
    return Credentials(state, status, ingredients, generation, active.get("signature_info", {}), active)


def _read_file(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RDMError(f"{path}: cannot read it ({e.strerror or e})") from None


__all__ = ["Credentials", "SigningIdentity", "embed", "ingredient", "local_identity", "make_identity", "manifest",
           "public_provenance", "read"]
