//! The EC2 client: the SDK's standard credential chain (environment,
//! profiles, SSO, instance roles), `--profile` and `--region`, rustls with
//! ring, and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_EC2` as the SDK reads
//! them. Errors become one sentence a person can act on.

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::{ProvideCredentials, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// An AWS failure, as a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AwsError(pub String);

impl AwsError {
    pub fn new(message: impl Into<String>) -> AwsError {
        AwsError(message.into())
    }
}

/// A connected client and the region it talks to.
#[derive(Clone)]
pub struct Ec2 {
    pub client: aws_sdk_ec2::Client,
    pub region: String,
}

/// Where to find the account: `--profile` and `--region`, each falling back
/// to the SDK's own lookup (`AWS_PROFILE`, `AWS_REGION`, `~/.aws/config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    pub profile: Option<String>,
    pub region: Option<String>,
}

/// Loads the configuration and checks that credentials resolve, so that a
/// missing login is reported before anything else happens.
pub async fn connect(account: &Account) -> Result<Ec2, AwsError> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(p) = &account.profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = &account.region {
        loader = loader.region(Region::new(r.clone()));
    }
    let conf = loader.load().await;
    let Some(region) = conf.region().map(|r| r.to_string()) else {
        return Err(AwsError::new(
            "no AWS region: pass --region, or set AWS_REGION or `region` in ~/.aws/config",
        ));
    };
    let Some(creds) = conf.credentials_provider() else {
        return Err(no_credentials("no credential provider is configured"));
    };
    if let Err(e) = creds.provide_credentials().await {
        return Err(no_credentials(
            &aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
        ));
    }
    Ok(Ec2 {
        client: aws_sdk_ec2::Client::new(&conf),
        region,
    })
}

fn no_credentials(detail: &str) -> AwsError {
    AwsError(format!(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, run `aws configure` \
         or `aws sso login`, or pass --profile NAME ({detail})"
    ))
}

/// The error code of a service error (`InvalidAMIID.NotFound`, …); EC2's
/// errors arrive unmodelled, so they are matched on their code.
pub fn code<E: ProvideErrorMetadata>(err: &SdkError<E>) -> Option<&str> {
    match err {
        SdkError::ServiceError(_) => err.code(),
        _ => None,
    }
}

/// A message for an error no caller handled: authentication and permission
/// problems, an unreachable endpoint, then the code and AWS's own message.
pub fn describe<E>(what: &str, err: &SdkError<E>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let msg = err.message().unwrap_or_default();
    match code(err) {
        Some("AuthFailure") | Some("InvalidClientTokenId") | Some("SignatureDoesNotMatch") => {
            AwsError(format!(
                "AWS rejected the credentials while trying to {what}: {msg} (check the profile, or renew an SSO session with `aws sso login`)"
            ))
        }
        Some("ExpiredToken") | Some("RequestExpired") => AwsError(format!(
            "the AWS session expired while trying to {what}; log in again (`aws sso login`)"
        )),
        Some("UnauthorizedOperation") => {
            AwsError(format!("your AWS identity may not {what}: {msg}"))
        }
        Some("OptInRequired") => AwsError(format!(
            "this account is not subscribed to the region or image needed to {what}: {msg}"
        )),
        Some(c) => AwsError(format!("cannot {what}: {c}: {msg}")),
        None => AwsError(format!(
            "cannot {what}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(err)
        )),
    }
}
