// The benchmark's peer: oidc-provider issuing JWT access tokens (RFC 9068) for client_credentials, through
// resource indicators, signed with $ALG (ES256 | RS256 | EdDSA). Prints "peer listening on http://..." when ready.
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const alg = process.env.ALG ?? 'ES256';
const port = Number(process.env.PORT ?? 0);

function signingKey() {
  const kp =
    alg === 'ES256' ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : alg === 'RS256' ? generateKeyPairSync('rsa', { modulusLength: 2048 })
    : generateKeyPairSync('ed25519');
  return { ...kp.privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid: `bench-${alg}` };
}

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'bench',
    client_secret: 'bench-secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: alg,
  }],
  jwks: { keys: [signingKey()] },
  scopes: ['orders:read'],
  enabledJWA: {
    idTokenSigningAlgValues: ['ES256', 'RS256', 'EdDSA'],
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:kubetoken:bench',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'orders:read',
        audience: 'bench',
        accessTokenTTL: 3600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg } },
      }),
    },
  },
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`peer listening on http://127.0.0.1:${server.address().port}`);
});
